"""The kernel structure offsets the agent reads from the running kernel's BTF
(/sys/kernel/btf/vmlinux) at start-up, as it logs them at debug level: they must be
there and make sense on this kernel, whatever its version. (This was a unit test that
read the build machine's kernel; it lives here because only this suite runs on the
kernel the agent traces.)"""
import re

import pytest

from sonde_testlib import Agent

POINTERS = ["task_files", "files_fdt", "fdtable_fd", "file_private_data", "file_f_inode",
            "socket_file", "socket_sk", "task_mm"]
NONZERO = POINTERS + ["task_exit_code", "sk_family", "sk_dport", "sk_num", "sk_v6_daddr",
                      "sk_protocol", "mm_arg_start", "mm_env_start"]


def logged_offsets(agent: Agent) -> dict[str, int]:
    log = agent.stderr_tail(1 << 20)
    m = re.search(r"kernel structure offsets offsets=KernelOffsets \{([^}]*)\}", log)
    if not m:
        pytest.fail(f"the agent did not log its kernel structure offsets\n--- stderr ---\n{log[-3000:]}",
                    pytrace=False)
    return {k: int(v) for k, v in re.findall(r"(\w+): (\d+)", m.group(1))}


def test_offsets_from_the_running_kernels_btf_are_plausible(tmp_path):
    agent = Agent(tmp_path, args=["--log", "info,sonde::probes=debug"]).start()
    try:
        o = logged_offsets(agent)
    finally:
        assert agent.stop() == 0, agent.stderr_tail()
    missing = [k for k in NONZERO if k not in o]
    assert not missing, f"offsets not logged: {missing}; got {o}"
    for name in NONZERO:
        assert 0 < o[name] < 16384, f"{name} = {o[name]} is implausible ({o})"
    for name in POINTERS:
        assert o[name] % 8 == 0, f"{name} = {o[name]} is not pointer-aligned"
    # struct sock_common's layout, the same on every kernel the agent supports.
    assert o["sk_family"] < 32
    assert o["sk_daddr"] < 32 and o["sk_rcv_saddr"] == o["sk_daddr"] + 4, o
    assert o["sk_num"] == o["sk_dport"] + 2, o
    assert o["sk_v6_daddr"] >= 32 and o["sk_v6_rcv_saddr"] >= 32, o
    assert o["sk_v6_daddr"] != o["sk_v6_rcv_saddr"], o
    assert o["sk_protocol"] > o["sk_v6_rcv_saddr"], "sk_protocol comes after __sk_common"
    assert o["socket_type"] < o["socket_file"] and o["socket_type"] < o["socket_sk"], o
    assert o["fdtable_max_fds"] < o["fdtable_fd"], o
    assert o["mm_arg_start"] < o["mm_arg_end"] <= o["mm_env_start"] < o["mm_env_end"], o
