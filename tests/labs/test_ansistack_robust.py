"""Whatever values an inventory's variables hold, the plan is made and reads as lines: problems, never an
exception (the page shows the plan of any upload)."""

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from labs.ansistack import MACHINE_VARS, plan_inventory, report_lines

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.text(max_size=12))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8,
)
host_vars = st.dictionaries(st.sampled_from(sorted(MACHINE_VARS | {"server_networks", "other_var"})), values)


@pytest.mark.django_db
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(vm=host_vars, server=host_vars, group=st.sampled_from(["provisioned_vms", "bootable_vms", "all_vms"]))
def test_any_values_give_a_plan(vm, server, group):
    inventory = {
        "all": {
            "children": {
                "libvirt_hosts": {"hosts": {"kvm-a": {"ansible_host": "198.51.100.7", **server}}},
                "all_vms": {"children": {group: {"hosts": {"vm-0": {"vm_virt_host": "kvm-a", **vm}}}}}
                if group != "all_vms"
                else {"hosts": {"vm-0": vm}},
            }
        }
    }
    text = yaml.safe_dump(inventory)
    plan = plan_inventory([{"name": "fuzz.yaml", "text": text}]).as_dict()
    lines = report_lines(plan)
    assert lines[0] == "lab: fuzz"
