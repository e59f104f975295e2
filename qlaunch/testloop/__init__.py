"""The kernel test loop behind `qlaunch exec`: spec, driver, console scanner, matrix."""
