"""`flock install-cni`: what lands in the bin and conf dirs, atomically and idempotently."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from flock.cni import install

PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else None


def snapshot(*dirs: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry's (inode, mtime_ns, mode): any rewrite or replacement changes it."""
    out = {}
    for d in dirs:
        for p in [d, *d.rglob("*")]:
            st = p.lstat()
            out[str(p)] = (st.st_ino, st.st_mtime_ns, st.st_mode)
    return out


def fake_bundle(root: Path, marker: str) -> Path:
    """A bundle-shaped directory whose launcher is a script that prints `marker`."""
    (root / "flock.d").mkdir(parents=True)
    (root / "flock.d" / "marker").write_text(marker)
    entry = root / "flock"
    entry.write_text(f"#!/bin/sh\necho '{marker}'\n")
    entry.chmod(0o755)
    return root


@pytest.mark.skipif(PYTHON is None, reason="needs /usr/bin/python3")
def test_python_install_runs_and_is_idempotent(tmp_path: Path) -> None:
    assert PYTHON is not None
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    actions = install.install(bin_dir=bin_dir, conf_dir=conf_dir, python=PYTHON)
    assert any("wrote" in a and a.endswith("/flock") for a in actions)
    entry = bin_dir / "flock"
    assert stat.S_IMODE(entry.stat().st_mode) == 0o755
    assert entry.read_text().startswith(f"#!{PYTHON} -IS\n")
    tree = bin_dir / os.readlink(bin_dir / "flock.d")
    assert tree.name.startswith(".flock-")
    assert list((tree / "__pycache__").glob("flock_cni_plugin.*.pyc")), "not precompiled"
    p = subprocess.run(
        [str(entry)],
        input=b'{"cniVersion": "1.0.0"}',
        capture_output=True,
        env={"CNI_COMMAND": "VERSION"},
        check=True,
    )
    assert json.loads(p.stdout)["cniVersion"] == "1.0.0"

    before = snapshot(bin_dir, conf_dir)
    assert install.install(bin_dir=bin_dir, conf_dir=conf_dir, python=PYTHON) == []
    assert snapshot(bin_dir, conf_dir) == before
    assert not [p.name for p in bin_dir.iterdir() if ".tmp-" in p.name or "staging" in p.name]


def test_conflist_contents(tmp_path: Path) -> None:
    b = fake_bundle(tmp_path / "b", "v1")
    install.install(
        bin_dir=tmp_path / "bin",
        conf_dir=tmp_path / "net.d",
        bundle=b,
        socket="/run/fp/agent.sock",
        state_dir="/var/lib/fp",
    )
    conf_path = tmp_path / "net.d" / "01-flock.conflist"
    assert stat.S_IMODE(conf_path.stat().st_mode) == 0o644
    conf = json.loads(conf_path.read_text())
    assert conf == {
        "cniVersion": "1.0.0",
        "cniVersions": ["0.4.0", "1.0.0", "1.1.0"],
        "name": "flock",
        "plugins": [
            {"type": "flock", "agentSocket": "/run/fp/agent.sock", "stateDir": "/var/lib/fp"}
        ],
    }


def test_portmap_is_chained_only_on_request() -> None:
    plain = json.loads(
        install.render_conflist(socket="/s", state_dir="", cni_version="1.1.0", portmap=False)
    )
    assert [p["type"] for p in plain["plugins"]] == ["flock"]
    assert plain["cniVersion"] == "1.1.0"
    chained = json.loads(
        install.render_conflist(socket="/s", state_dir="", cni_version="1.0.0", portmap=True)
    )
    assert [p["type"] for p in chained["plugins"]] == ["flock", "portmap"]
    assert chained["plugins"][1]["capabilities"] == {"portMappings": True}


def test_upgrade_switches_atomically_and_keeps_the_previous_tree_once(tmp_path: Path) -> None:
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    v1 = fake_bundle(tmp_path / "v1", "v1")
    v2 = fake_bundle(tmp_path / "v2", "v2")
    install.install(bin_dir=bin_dir, conf_dir=conf_dir, bundle=v1)
    tree1 = os.readlink(bin_dir / "flock.d")
    assert subprocess.run([bin_dir / "flock"], capture_output=True, text=True).stdout == "v1\n"

    actions = install.install(bin_dir=bin_dir, conf_dir=conf_dir, bundle=v2)
    tree2 = os.readlink(bin_dir / "flock.d")
    assert tree2 != tree1
    assert (bin_dir / "flock.d" / "marker").read_text() == "v2"
    assert subprocess.run([bin_dir / "flock"], capture_output=True, text=True).stdout == "v2\n"
    # The previous tree stays for plugin processes that started just before the switch...
    assert (bin_dir / tree1).is_dir()
    assert not any("conflist" in a for a in actions)  # config unchanged: not rewritten
    # ...and goes at the next install.
    assert install.install(bin_dir=bin_dir, conf_dir=conf_dir, bundle=v2) == [
        f"removed old plugin tree {tree1}"
    ]
    assert sorted(p.name for p in bin_dir.iterdir()) == sorted(["flock", "flock.d", tree2])


def test_damaged_tree_of_the_same_version_is_repaired(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    b = fake_bundle(tmp_path / "b", "v1")
    install.install(bin_dir=bin_dir, conf_dir=tmp_path / "net.d", bundle=b)
    (bin_dir / "flock.d" / "marker").write_text("corrupted")
    actions = install.install(bin_dir=bin_dir, conf_dir=tmp_path / "net.d", bundle=b)
    assert any("installed plugin tree" in a for a in actions)
    assert (bin_dir / "flock.d" / "marker").read_text() == "v1"


def test_leftovers_of_an_interrupted_install_are_removed(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    (bin_dir / ".flock-deadbeef.tmp-123" / "x").mkdir(parents=True)
    b = fake_bundle(tmp_path / "b", "v1")
    install.install(bin_dir=bin_dir, conf_dir=tmp_path / "net.d", bundle=b)
    assert not (bin_dir / ".flock-deadbeef.tmp-123").exists()


def test_other_plugins_in_the_bin_dir_are_untouched(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "portmap").write_text("x")
    (bin_dir / "flockish").write_text("y")
    install.install(
        bin_dir=bin_dir, conf_dir=tmp_path / "net.d", bundle=fake_bundle(tmp_path / "b", "1")
    )
    assert (bin_dir / "portmap").read_text() == "x"
    assert (bin_dir / "flockish").read_text() == "y"


def test_write_atomic_leaves_no_temp_and_replaces_by_rename(tmp_path: Path) -> None:
    target = tmp_path / "f"
    assert install.write_atomic(target, b"one", 0o644)
    ino = target.stat().st_ino
    held = target.open("rb")  # a reader holding the old file keeps seeing it whole
    assert install.write_atomic(target, b"two", 0o644)
    assert held.read() == b"one"
    held.close()
    assert target.read_bytes() == b"two" and target.stat().st_ino != ino
    assert not install.write_atomic(target, b"two", 0o644)
    assert install.write_atomic(target, b"two", 0o600)  # mode change is a change
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_cli_errors_are_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = install.main(
        [
            "--bin-dir",
            str(tmp_path / "bin"),
            "--conf-dir",
            str(tmp_path / "c"),
            "--bundle",
            str(tmp_path / "none"),
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "no plugin bundle at" in err and "build_plugin_bundle.py" in err
    rc = install.main(
        ["--bin-dir", str(tmp_path / "b"), "--conf-dir", str(tmp_path / "c"), "--socket", "rel"]
    )
    assert rc == 1
    assert "absolute" in capsys.readouterr().err
    rc = install.main(
        [
            "--bin-dir",
            str(tmp_path / "b"),
            "--conf-dir",
            str(tmp_path / "c"),
            "--python",
            "/nonexistent/python",
        ]
    )
    assert rc == 1
    assert "cannot run it" in capsys.readouterr().err


def test_cli_warns_about_configs_that_sort_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    (conf_dir / "00-other.conflist").write_text("{}")
    (conf_dir / "99-late.conf").write_text("{}")
    b = fake_bundle(tmp_path / "b", "1")
    rc = install.main(
        ["--bin-dir", str(tmp_path / "bin"), "--conf-dir", str(conf_dir), "--bundle", str(b)]
    )
    assert rc == 0
    captured = capsys.readouterr()
    assert "00-other.conflist" in captured.err and "99-late" not in captured.err
    assert "wrote" in captured.out
    rc = install.main(
        ["--bin-dir", str(tmp_path / "bin"), "--conf-dir", str(conf_dir), "--bundle", str(b)]
    )
    assert "nothing changed" in capsys.readouterr().out


@pytest.mark.skipif(
    PYTHON is None or shutil.which("cc") is None or shutil.which("ldd") is None,
    reason="building the bundle needs /usr/bin/python3, cc and ldd",
)
def test_bundle_build_is_reproducible_so_reinstalling_an_image_changes_nothing(
    tmp_path: Path,
) -> None:
    assert PYTHON is not None
    build = Path(__file__).resolve().parents[2] / "packaging" / "build_plugin_bundle.py"
    for out in ("a", "b"):
        subprocess.run(
            [PYTHON, str(build), "--out", str(tmp_path / out)], check=True, capture_output=True
        )
    assert install.tree_digest(tmp_path / "a" / "flock.d") == install.tree_digest(
        tmp_path / "b" / "flock.d"
    )
    assert (tmp_path / "a" / "flock").read_bytes() == (tmp_path / "b" / "flock").read_bytes()
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    install.install(bin_dir=bin_dir, conf_dir=conf_dir, bundle=tmp_path / "a")
    assert install.install(bin_dir=bin_dir, conf_dir=conf_dir, bundle=tmp_path / "b") == []


def test_a_real_flock_d_directory_is_displaced_then_pruned(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    (bin_dir / "flock.d").mkdir(parents=True)
    (bin_dir / "flock.d" / "old").write_text("hand-made")
    b = fake_bundle(tmp_path / "b", "v1")
    install.install(bin_dir=bin_dir, conf_dir=tmp_path / "net.d", bundle=b)
    assert (bin_dir / "flock.d").is_symlink()
    assert (bin_dir / "flock.d" / "marker").read_text() == "v1"
    names = sorted(p.name for p in bin_dir.iterdir())
    assert names == sorted(["flock", "flock.d", os.readlink(bin_dir / "flock.d")])


def test_uninstall_removes_only_what_install_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    bin_dir.mkdir()
    (bin_dir / "portmap").write_text("x")
    b = fake_bundle(tmp_path / "b", "v1")
    install.install(bin_dir=bin_dir, conf_dir=conf_dir, bundle=b)
    (conf_dir / "10-other.conflist").write_text("{}")
    argv = ["--bin-dir", str(bin_dir), "--conf-dir", str(conf_dir), "--uninstall"]
    assert install.main(argv) == 0
    assert "removed" in capsys.readouterr().out
    assert sorted(p.name for p in bin_dir.iterdir()) == ["portmap"]
    assert sorted(p.name for p in conf_dir.iterdir()) == ["10-other.conflist"]
    assert install.main(argv) == 0
    assert "nothing to remove" in capsys.readouterr().out


def test_uninstall_leaves_a_foreign_conflist_of_the_same_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    foreign = {"cniVersion": "1.0.0", "name": "x", "plugins": [{"type": "bridge"}]}
    (conf_dir / "01-flock.conflist").write_text(json.dumps(foreign))
    argv = ["--bin-dir", str(tmp_path / "bin"), "--conf-dir", str(conf_dir), "--uninstall"]
    assert install.main(argv) == 1
    assert "not flock's conflist" in capsys.readouterr().err
    assert (conf_dir / "01-flock.conflist").exists()
