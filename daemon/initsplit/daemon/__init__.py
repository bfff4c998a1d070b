"""initsplitd, the boot-time daemon: configuration, journal reporting, sd_notify."""
