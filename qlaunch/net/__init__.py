"""Virtual networks: definitions, links (pyroute2), NAT (nftables), DHCP (dnsmasq), namespaces.

Everything here runs in the network namespace the caller names (`--netns`, `QLAUNCH_NETNS`) or in
the caller's own. A network's runtime state (dnsmasq files, attached VMs) lives under
`state_dir()/.networks/<namespace>/<network>/`: the dot keeps it out of the VM name space.
"""
