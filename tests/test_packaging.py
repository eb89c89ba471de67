"""The package as installed: one version string, the console scripts the documentation names."""

from importlib.metadata import entry_points, version

import hive_adapter


def test_the_installed_version_is_the_package_version():
    # setup.py reads hive_adapter/version.py; a stale install (version bumped, not reinstalled) fails here
    assert version("hive-adapter") == hive_adapter.__version__


def test_every_console_script_resolves():
    scripts = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name.startswith("hive-")}
    assert set(scripts) >= {"hive-train", "hive-export-vision", "hive-analyze", "hive-probe", "hive-reproduce"}
    for script in scripts.values():
        assert callable(script.load()), script.name
