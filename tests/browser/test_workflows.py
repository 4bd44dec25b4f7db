"""A workflow run from the browser: gunicorn, the real Huey worker and ansible-runner. A user ticks two of their
machines in the machine list, presses "Run workflow", picks the workflow, fills its form (a secret too) and
watches the run's output come in on its page until the per-host summary and the log; then starts one from the
machine's page and cancels it. The playbook's play says `connection: local`, so ansible-playbook acts on this
host (in a temporary directory) for each machine instead of reaching a guest over SSH (the guest test,
tests/integration/test_workflows_real.py, does that)."""

import pytest
from playwright.sync_api import expect

from hypervisors.models import HypervisorStatus
from machines.states import Status
from tests.browser.test_hypervisors import login
from tests.conftest import ARTIFACTS, wait_for
from tests.factories import HypervisorFactory, MachineFactory, UserFactory
from workflows import services
from workflows.models import WorkflowRun

pytestmark = pytest.mark.browser

SECRET = "browser-secret-8c1f"
PLAYBOOK = """\
- name: Greet and write a file
  hosts: all
  connection: local
  gather_facts: false
  vars:
    ansible_python_interpreter: "{{ ansible_playbook_python }}"
  tasks:
    - name: say hello
      ansible.builtin.debug:
        msg: "{{ greeting }} from {{ inventory_hostname }}"
    - name: take a moment
      ansible.builtin.wait_for:
        timeout: "{{ pause }}"
    - name: write the file
      ansible.builtin.copy:
        content: "{{ greeting }} {{ api_token | length }}\\n"
        dest: "{{ out_dir }}/{{ inventory_hostname }}.txt"
        mode: "0600"
    - name: read it back
      ansible.builtin.command: cat {{ out_dir }}/{{ inventory_hostname }}.txt
      changed_when: false
"""


def _workflow(tmp_path, staff):
    directory = tmp_path / "greet"
    directory.mkdir()
    (directory / "playbook.yml").write_text(PLAYBOOK)
    out = tmp_path / "out"
    out.mkdir()
    variables = [
        {"name": "greeting", "type": "string", "default": "hello", "help": "What to say"},
        {"name": "pause", "type": "integer", "default": 2, "help": "Seconds the second task waits"},
        {"name": "out_dir", "type": "string", "default": str(out)},
        {"name": "api_token", "type": "string", "secret": True, "required": True},
    ]
    workflow = services.workflow_register(
        actor=staff, name="greet", description="Says hello and writes a file.", directory=str(directory),
        variables=variables,
    )  # fmt: skip
    return workflow, out


def test_a_user_runs_a_workflow_on_a_selection_and_watches_its_output(page, web_server, worker, tmp_path):
    staff = UserFactory(username="wf-chief", is_staff=True, is_superuser=True)
    user = UserFactory(username="wf-user", password="correct-horse-battery")
    # Rows only: the hypervisor is disabled, so the worker's reconcile leaves these active machines alone.
    hv = HypervisorFactory(name="wf-rows", enabled=False, status=HypervisorStatus.ONLINE)
    web1, web2 = (MachineFactory(name=n, owner=user, hypervisor=hv, status=Status.ACTIVE) for n in ("web1", "web2"))
    MachineFactory(name="web3", owner=user, hypervisor=hv, status=Status.ACTIVE)
    workflow, out = _workflow(tmp_path, staff)

    login(page, web_server, "wf-user", "correct-horse-battery")
    page.locator("#nav").get_by_role("link", name="Machines").click()
    page.get_by_label("Select web1").check()
    page.get_by_label("Select web2").check()
    page.wait_for_timeout(10_500)  # the list refreshes itself every 10 s: the ticks survive it
    expect(page.get_by_label("Select web1")).to_be_checked()
    page.locator("#btn-run-workflow").click()
    expect(page.locator("#start-targets")).to_contain_text("web1")
    expect(page.locator("#start-targets")).to_contain_text("web2")
    page.locator("#start-workflows").get_by_text("greet").click()
    expect(page.locator("#id_machines")).to_have_values([str(web1.pk), str(web2.pk)])
    page.fill("#id_var_greeting", "bonjour")
    page.fill("#id_var_pause", "1e30")  # a bad value first: a message, and the secret is not sent back
    page.fill("#id_var_api_token", SECRET)
    page.locator("#btn-start-run").click()
    expect(page.locator(".invalid-feedback").first).to_contain_text("whole number")
    expect(page.locator("#id_var_api_token")).to_have_value("")
    assert SECRET not in page.content()
    page.fill("#id_var_pause", "3")
    page.fill("#id_var_api_token", SECRET)
    page.locator("#btn-start-run").click()

    run = wait_for(lambda: WorkflowRun.objects.filter(workflow=workflow).first(), 10)
    expect(page.locator("#run-state")).to_contain_text(f"Run {run.pk} of greet")
    expect(page.locator("#run-events")).to_contain_text("TASK [say hello]", timeout=60_000)
    expect(page.locator("#run-status")).to_contain_text("Running")
    page.screenshot(path=str(ARTIFACTS / "browser-workflow-running.png"), full_page=True)
    assert page.locator("#run-summary").count() == 0  # not before the end
    expect(page.locator("#run-status")).to_contain_text("Successful", timeout=90_000)
    events = page.locator("#run-events")
    expect(events).to_contain_text("TASK [write the file]")
    expect(events.locator(".run-badge-changed")).to_have_count(2)  # the file, on each machine
    expect(events).to_contain_text("bonjour from web1")
    summary = page.locator("#run-summary")
    expect(summary).to_contain_text("web1")
    expect(summary).to_contain_text("web2")
    expect(page.locator("#run-variables")).to_contain_text("api_token")
    page.locator("#run-log summary").click()
    expect(page.locator("#run-log pre")).to_contain_text("PLAY RECAP")
    assert SECRET not in page.content()
    assert page.locator("#run-cancel").count() == 0
    # Each event once, in order, though the page asked for them a second at a time.
    counters = [int(c) for c in events.locator(".run-event").evaluate_all("els => els.map(e => e.dataset.counter)")]
    assert counters == sorted(set(counters)) and len(counters) == run.events.count()
    page.screenshot(path=str(ARTIFACTS / "browser-workflow-done.png"), full_page=True)
    assert (out / "web1.txt").read_text() == f"bonjour {len(SECRET)}\n"
    run.refresh_from_db()
    assert run.status == "successful" and SECRET not in run.stdout

    # From a machine's page, a long one, cancelled while it runs.
    page.goto(f"{web_server}/machines/{web1.pk}/")
    page.locator("#btn-run-workflow").click()
    page.locator("#start-workflows").get_by_text("greet").click()
    expect(page.locator("#id_machines")).to_have_values([str(web1.pk)])
    page.fill("#id_var_pause", "120")
    page.fill("#id_var_api_token", SECRET)
    page.locator("#btn-start-run").click()
    expect(page.locator("#run-events")).to_contain_text("TASK [take a moment]", timeout=60_000)
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#run-cancel button").click()
    expect(page.locator("#run-status")).to_contain_text("Cancelled", timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "browser-workflow-cancelled.png"), full_page=True)
    second = WorkflowRun.objects.exclude(pk=run.pk).get()
    assert second.status == "cancelled" and second.finished is not None
