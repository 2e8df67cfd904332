"""The fake netlab (tests/fake_netlab.py) runs remote_lab.py's own simulation without importing
all of remote_lab.py: these tests keep that fast path working and the code the same."""
import __future__
import builtins
import dis
import json
import subprocess
import sys
import types

from helpers import FAKE_NETLAB, ROOT

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(FAKE_NETLAB.parent))

import fake_netlab  # noqa: E402
import remote_lab  # noqa: E402

FUTURE = __future__.annotations.compiler_flag


def without_future_flag(code):
    """``code`` (and the code nested in it) as if compiled without ``from __future__ import
    annotations``, which the fake uses so the section's typing names need not be imported."""
    consts = tuple(without_future_flag(c) if isinstance(c, types.CodeType) else c
                   for c in code.co_consts)
    return code.replace(co_flags=code.co_flags & ~FUTURE, co_consts=consts)


def test_the_fake_finds_the_simulation_section_of_remote_lab():
    sim = fake_netlab.load_simulation()
    assert sim is not None, "remote_lab.py's section 10 moved: update tests/fake_netlab.py"
    assert fake_netlab.remote_lab is not remote_lab


def test_the_fakes_simulation_is_remote_labs_code_byte_for_byte():
    sim = fake_netlab.load_simulation()
    functions = {n: f for n, f in vars(sim).items() if isinstance(f, types.FunctionType)}
    assert {"simulated_netlab_main", "sim_registry", "simulated_down",
            "simulated_status"} <= set(functions)
    for name, func in functions.items():
        theirs = getattr(remote_lab, name)
        assert without_future_flag(func.__code__) == theirs.__code__, name
        assert func.__defaults__ == theirs.__defaults__, name
    constants = {n: v for n, v in vars(sim).items() if n.isupper()}
    assert {"SIM_SNAPSHOT", "SIM_GENERATED"} <= set(constants)
    for name, value in constants.items():
        assert value == getattr(remote_lab, name), name


def test_a_fake_netlab_call_does_not_import_the_server(tmp_path):
    probe = ("import sys; sys.argv = ['netlab', 'version']; import fake_netlab; "
             "print(sorted(m for m in ('http.server', 'argparse', 'remote_lab') "
             "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=str(FAKE_NETLAB.parent),
                         capture_output=True, text=True, timeout=30,
                         env={"FAKE_NETLAB_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_cached_compiled_simulation_is_the_same_code(tmp_path, monkeypatch):
    fresh = fake_netlab.load_simulation()
    monkeypatch.setattr(sys, "pycache_prefix", str(tmp_path))
    written = fake_netlab.load_simulation()  # compiles, writes the cache
    assert len(list(tmp_path.glob("fake_netlab.*.marshal"))) == 1
    cached = fake_netlab.load_simulation()  # reads it
    for name in ("simulated_netlab_main", "sim_registry", "simple_topology_nodes"):
        code = getattr(fresh, name).__code__
        assert getattr(written, name).__code__ == code == getattr(cached, name).__code__, name
        assert getattr(cached, name).__code__.co_filename == str(fake_netlab.REMOTE_LAB)


def globals_used(code):
    """The global names ``code`` (and the code nested in it) loads."""
    names = {i.argval for i in dis.get_instructions(code) if i.opname == "LOAD_GLOBAL"}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= globals_used(const)
    return names


def test_the_simulation_needs_nothing_the_fake_leaves_out():
    """A name section 10 starts using from elsewhere in remote_lab.py would be a NameError in
    every fake call: add it to SECTION_NEEDS (or keep the section self-contained)."""
    sim = fake_netlab.load_simulation()
    used = set()
    for func in vars(sim).values():
        if isinstance(func, types.FunctionType):
            used |= globals_used(func.__code__)
    missing = sorted(n for n in used if n not in vars(sim) and not hasattr(builtins, n))
    assert missing == []


def netlab(cwd, *args, control):
    return subprocess.run([sys.executable, str(FAKE_NETLAB)] + list(args), cwd=str(cwd),
                          capture_output=True, text=True, timeout=30,
                          env={"FAKE_NETLAB_DIR": str(control), "PATH": "/usr/bin:/bin"})


def test_the_simulation_runs_multilab_instances_side_by_side(tmp_path):
    """netlab 26.10's multilab plugin (shared notes netlab-multilab.md): `up --plugin multilab
    -s defaults.multilab.id=K` registers instance K, named ml-K, management 192.168.K.0/24;
    an id already running elsewhere is refused; `down` in a lab dir ends only its instance."""
    control = tmp_path / "control"
    control.mkdir()
    labs = {}
    for k in (1, 2):
        labs[k] = tmp_path / ("lab%d" % k)
        labs[k].mkdir()
        (labs[k] / "topo.yml").write_text("nodes: [r1, r2]\n")
        up = netlab(labs[k], "up", "--plugin", "multilab", "-s", "defaults.multilab.id=%d" % k,
                    "-s", "defaults.multilab.lock=%s" % (tmp_path / "netlab.lock"), "topo.yml",
                    control=control)
        assert up.returncode == 0, up.stdout + up.stderr
    reg = json.loads(netlab(tmp_path, "status", "--all", "--format", "json",
                            control=control).stdout)
    assert {k: (v["dir"], v["status"], v["name"]) for k, v in reg.items()} == {
        "1": (str(labs[1]), "started", "ml-1"), "2": (str(labs[2]), "started", "ml-2")}
    r1 = json.loads(netlab(labs[2], "inspect", "--node", "r1", "--format", "json",
                           control=control).stdout)
    assert r1["mgmt"]["ipv4"] == "192.168.2.101"
    other = tmp_path / "other"
    other.mkdir()
    (other / "topo.yml").write_text("nodes: [x]\n")
    taken = netlab(other, "up", "--plugin", "multilab", "-s", "defaults.multilab.id=1",
                   "topo.yml", control=control)
    assert taken.returncode == 1 and "instance '1' is already running in directory %s" \
        % labs[1] in taken.stdout
    assert netlab(labs[1], "down", "--cleanup", control=control).returncode == 0
    reg = json.loads(netlab(tmp_path, "status", "--all", "--format", "json",
                            control=control).stdout)
    assert list(reg) == ["2"]
    plain = netlab(other, "up", "topo.yml", control=control)  # no plugin: instance default
    assert plain.returncode == 0
    x = json.loads(netlab(other, "inspect", "--node", "x", "--format", "json",
                          control=control).stdout)
    assert x["mgmt"]["ipv4"] == "192.168.121.101"
