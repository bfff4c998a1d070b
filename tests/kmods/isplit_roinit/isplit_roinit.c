// SPDX-License-Identifier: GPL-2.0
/*
 * Test module exercising the sections a core/init split must get right:
 *  - __ro_after_init data (.data..ro_after_init) written by init, read later;
 *  - a static key defined in the module, enabled in init, and tested both in
 *    __init code and in core code (so __jump_table has entries pointing into
 *    .init.text and .text);
 *  - a WARN in init (a __bug_table entry pointing into .init.text);
 *  - a module parameter read in init and a read-only sysfs attribute
 *    (/sys/module/isplit_roinit/parameters/state) evaluated after init.
 */
#include <linux/bug.h>
#include <linux/init.h>
#include <linux/jump_label.h>
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/printk.h>

static int param = 7;
module_param(param, int, 0444);
MODULE_PARM_DESC(param, "printed by init");

static int value __ro_after_init;
DEFINE_STATIC_KEY_FALSE(isplit_key);

/* Static branch in init text: its jump entry must be patched while init runs. */
static noinline int __init isplit_roinit_key_in_init(void)
{
	if (static_branch_unlikely(&isplit_key))
		return 1;
	return 0;
}

/* Static branch in core text: must still read 1 after init memory is gone. */
static noinline int isplit_roinit_key_in_core(void)
{
	if (static_branch_unlikely(&isplit_key))
		return 1;
	return 0;
}

static int isplit_roinit_state_get(char *buf, const struct kernel_param *kp)
{
	return scnprintf(buf, PAGE_SIZE, "value=%d key=%d\n", value,
			 isplit_roinit_key_in_core());
}

static const struct kernel_param_ops isplit_roinit_state_ops = {
	.get = isplit_roinit_state_get,
};
module_param_cb(state, &isplit_roinit_state_ops, NULL, 0444);
MODULE_PARM_DESC(state, "value=<ro_after_init value> key=<static key seen from core text>");

static int __init isplit_roinit_init(void)
{
	pr_info("isplit_roinit: param=%d\n", param);
	value = 42;
	static_branch_enable(&isplit_key);
	WARN(1, "isplit_roinit: expected warning\n");
	pr_info("isplit_roinit: value=%d key=%d\n", value, isplit_roinit_key_in_init());
	return 0;
}

static void __exit isplit_roinit_exit(void)
{
	pr_info("isplit_roinit: cleanup value=%d key=%d\n", value,
		isplit_roinit_key_in_core());
}

module_init(isplit_roinit_init);
module_exit(isplit_roinit_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("initsplit test: __ro_after_init, static key, WARN and a parameter in init");
