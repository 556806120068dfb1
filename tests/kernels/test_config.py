"""kernels.config: the one settings object (mc.config): read from the environment once, checked
on assignment, changed for a block by override()."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import minicnn as mc
from kernels import config
from kernels.config import Settings, settings

REPO = Path(__file__).resolve().parents[2]


def test_mc_config_is_the_kernels_settings_object():
    assert mc.config is settings
    assert set(settings.as_dict()) == set(config.FIELDS)


def test_defaults_and_the_environment():
    defaults = Settings.from_environment({})
    assert defaults.kernels == "fast" and defaults.cuda_kernels is True
    assert defaults.scratch == "reuse" and 1 <= defaults.threads <= 8
    env = {"MINICNN_KERNELS": "Plain", "MINICNN_CUDA_KERNELS": "off", "MINICNN_NUM_THREADS": "3",
           "MINICNN_SCRATCH": "fresh"}
    read = Settings.from_environment(env)
    assert (read.kernels, read.cuda_kernels, read.threads, read.scratch) == \
        ("plain", False, 3, "fresh")
    with pytest.raises(ValueError, match="MINICNN_NUM_THREADS must be an int"):
        Settings.from_environment({"MINICNN_NUM_THREADS": "many"})
    with pytest.raises(ValueError, match=r"kernels must be one of.*MINICNN_KERNELS='slow'"):
        Settings.from_environment({"MINICNN_KERNELS": "slow"})


def test_the_environment_is_read_once_at_import():
    code = ("import minicnn as mc, os\n"
            "print(mc.config.threads, mc.config.kernels)\n"
            "os.environ['MINICNN_NUM_THREADS'] = '5'\n"
            "print(mc.config.threads)\n")
    env = {**os.environ, "MINICNN_NUM_THREADS": "3", "MINICNN_KERNELS": "plain",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["3", "plain", "3"]


@pytest.mark.parametrize("name, value, error", [
    ("kernels", "slow", ValueError), ("cuda_kernels", 1, TypeError), ("threads", 0, ValueError),
    ("threads", 2.5, ValueError), ("scratch", "never", ValueError),
    ("parallel_min_bytes", -1, ValueError), ("conv_chunk_rows", (5, 2), ValueError),
    ("shifted_max_waste", 0.5, ValueError), ("threads", True, ValueError),
])
def test_bad_values_raise_naming_the_setting(name, value, error):
    before = settings.as_dict()
    with pytest.raises(error, match=f"mc.config.{name}"):
        setattr(settings, name, value)
    assert settings.as_dict() == before


def test_unknown_settings_raise():
    with pytest.raises(AttributeError, match="no setting 'treads'"):
        settings.treads = 2
    with pytest.raises(TypeError, match="unknown settings"):
        Settings(treads=2)


def test_override_restores_everything_even_after_an_error():
    before = settings.as_dict()
    with settings.override(kernels="plain", threads=1, conv_chunk_rows=(5, 5)) as s:
        assert s is settings and settings.kernels == "plain" and settings.threads == 1
        settings.scratch = "fresh"                      # a change inside the block goes too
    assert settings.as_dict() == before
    with pytest.raises(KeyError):
        with settings.override(parallel_min_bytes=0):
            raise KeyError("inside")
    assert settings.as_dict() == before
    with pytest.raises(ValueError):
        with settings.override(threads=2, kernels="slow"):   # a bad value: nothing stays set
            pass
    assert settings.as_dict() == before


def test_threads_none_means_the_cpus_this_process_may_use():
    with settings.override(threads=None):
        assert settings.threads == config._available_cpus()
