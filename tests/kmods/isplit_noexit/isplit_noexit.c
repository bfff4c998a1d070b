// SPDX-License-Identifier: GPL-2.0
/*
 * Test module with an init function but no exit function: the kernel refuses
 * to unload it (rmmod fails with EBUSY), split or not.
 */
#include <linux/init.h>
#include <linux/module.h>
#include <linux/printk.h>

static int __init isplit_noexit_init(void)
{
	pr_info("isplit_noexit: init called\n");
	return 0;
}

module_init(isplit_noexit_init);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("initsplit test: module_init without module_exit");
