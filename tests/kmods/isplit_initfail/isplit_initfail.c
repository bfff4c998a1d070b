// SPDX-License-Identifier: GPL-2.0
/*
 * Test module whose init fails. The kernel must then free the module without
 * ever calling its exit function; a split module must behave the same way
 * (the "cleanup called" line must never appear).
 */
#include <linux/errno.h>
#include <linux/init.h>
#include <linux/module.h>
#include <linux/printk.h>

static int __init isplit_initfail_init(void)
{
	pr_info("isplit_initfail: init called\n");
	return -ENODEV;
}

static void __exit isplit_initfail_exit(void)
{
	pr_info("isplit_initfail: cleanup called\n");
}

module_init(isplit_initfail_init);
module_exit(isplit_initfail_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("initsplit test: module_init fails with -ENODEV");
