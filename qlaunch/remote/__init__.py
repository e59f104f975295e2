"""Other hosts, over the system's OpenSSH client: `qlaunch --connect URI`, live migration's
transport, and the Python API's Host (qlaunch.remote.host).

Only the roots (errors, paths, spawn) are imported here: the VM layer's live migration uses
the transport, so this package sits below it.
"""
