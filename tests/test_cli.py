"""The command line: each config mistake is one line naming the field, exit 2, before any compute;
--help is our short usage; --mode=fields lists the fields with their values and sources."""
import concurrent.futures
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--config=configs/digits.py:tiny"


def run_main(*args: str, workdir: str | None = None) -> subprocess.CompletedProcess:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  argv = [sys.executable, "-m", "farmer_jax.main", *args]
  if workdir:
    argv.append(f"--workdir={workdir}")
  return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


# (arguments, what the one line must say). Every case would otherwise start training tiny digits.
BAD = {
    "unknown_field": ((TINY, "--config.model.nope=1"), ["config.model.nope", "not a config field"]),
    "typo_suggests": ((TINY, "--config.train.lr=1e-3"),
                      ["config.train.lr", "did you mean config.train.learning_rate?"]),
    "unknown_top_level": ((TINY, "--config.nope=1"), ["config.nope", "not a config field"]),
    "unknown_nested": ((TINY, "--config.sharding.mesh.dat=2"),
                       ["config.sharding.mesh.dat", "config.sharding.mesh.data"]),
    "not_an_int": ((TINY, "--config.train.num_steps=abc"),
                   ["config.train.num_steps", "'abc'", "int"]),
    "float_for_int": ((TINY, "--config.train.batch_size=1.5"),
                      ["config.train.batch_size", "'1.5'", "int"]),
    "not_a_bool": ((TINY, "--config.data.hflip=maybe"), ["config.data.hflip", "true or false"]),
    "out_of_range": ((TINY, "--config.train.num_steps=-1"),
                     ["config.train.num_steps = -1", "positive integer"]),
    "inconsistent": ((TINY, "--config.train.noise_min=0.5"),
                     ["config.train.noise_min = 0.5", "train.noise_max"]),
    "invalid_in_plan_mode": ((TINY, "--mode=plan", "--config.train.num_steps=-1"),
                             ["config.train.num_steps = -1"]),
    "bad_rules": ((TINY, "--config.sharding.rules=abc"), ["config.sharding.rules[0] = 'abc'"]),
    # 3 divides none of the CPU device counts tests run with (1, 2, 4, 8).
    "mesh_vs_devices": ((TINY, "--config.sharding.mesh.fsdp=3"),
                        ["config.sharding.mesh", "'fsdp': 3"]),
    "missing_file": (("--config=configs/nope.py",), ["--config=configs/nope.py", "no such"]),
    "missing_file_with_override": (("--config=configs/nope.py", "--config.train.num_steps=3"),
                                   ["configs/nope.py", "no such"]),
    "unknown_variant": (("--config=configs/digits.py:bogus",), ["digits.py:bogus", "'bogus'"]),
    "no_config": ((), ["--config is required"]),
    "unknown_mode": ((TINY, "--mode=bogus"), ["--mode=bogus", "fields"]),
}


HELP_FLAGS = ("--help", "-h", "--helpfull")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
  """Every command of this file at once: each is a second of Python and JAX imports, mostly."""
  root = tmp_path_factory.mktemp("cli")
  commands = {name: (args, str(root / name)) for name, (args, _) in BAD.items()}
  commands.update({flag: ((flag,), None) for flag in HELP_FLAGS})
  commands.update({"no_workdir": ((TINY,), None), "fields": (("--mode=fields", TINY), None),
                   "fields_default": (("--mode=fields",), None)})
  with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
    futures = {name: pool.submit(run_main, *args, workdir=workdir)
               for name, (args, workdir) in commands.items()}
  return {name: (future.result(), commands[name][1]) for name, future in futures.items()}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_config_mistake_is_one_line_naming_it_and_exit_2(results, name):
  _, needles = BAD[name]
  result, workdir = results[name]
  lines = result.stderr.splitlines()
  assert result.returncode == 2, result.stderr
  assert len(lines) == 1 and lines[0].startswith("farmer_jax: "), result.stderr
  assert "Traceback" not in result.stderr
  for needle in needles:
    assert needle in lines[0]
  assert not os.path.exists(workdir)   # failed before the run touched anything


def test_missing_workdir_is_one_line(results):
  result, _ = results["no_workdir"]
  assert result.returncode == 2
  assert result.stderr.splitlines() == [
      "farmer_jax: --workdir is required with --mode=train (only --mode=fields goes without)"]


@pytest.mark.parametrize("flag", HELP_FLAGS)
def test_help_is_our_short_usage(results, flag):
  result, _ = results[flag]
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert out.startswith("usage: python -m farmer_jax.main --config=")
  for needle in ("train", "evaluate", "sample", "plan", "fid", "fields", "--workdir",
                 "--plan_devices", "--config.SECTION.FIELD=VALUE", "--mode=fields"):
    assert needle in out
  assert "tensorflow" not in out.lower() and "absl" not in out
  assert len(out.splitlines()) < 60


def field_line(out: str, path: str) -> str:
  [line] = [l for l in out.splitlines() if l.split() and l.split()[0] == path]
  return line


def test_fields_lists_the_configs_values_and_their_sources(results):
  result, _ = results["fields"]
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert field_line(out, "train.num_steps").split()[:3] == ["train.num_steps", "=", "20"]
  head_dim = field_line(out, "model.head_dim")
  assert "= 32" in head_dim and head_dim.endswith("# SPEC sec. 2")
  assert "# paper" in field_line(out, "train.b2")         # b1=..., b2=...,  # paper
  assert "None (str)" in field_line(out, "data.data_dir")  # a placeholder shows its type
  assert "sharding.mesh.data" in out and "[model]" in out
  # A comment continued on the lines below its field is read whole.
  assert "None: train.noise_min" in field_line(out, "distill.data_noise")


def test_fields_without_config_lists_the_defaults(results):
  result, _ = results["fields_default"]
  assert result.returncode == 0, result.stderr
  assert field_line(result.stdout, "train.learning_rate").split()[2] == "0.0001"
  assert field_line(result.stdout, "train.num_steps").split()[2] == "None"


def test_field_comments_read_groups_and_trailing_lines():
  from farmer_jax import cli  # noqa: PLC0415 (the parser alone, in-process)
  source = '''
def base_config():
  c = ml_collections.ConfigDict()
  c.seed = 0  # the seed
  # Heading of the section.
  c.s = dict(
      a=1,  # own
      # A group.
      b=2,
      c=3,
      d=4,  # d's own
            # and its second line
      e="#",
  )
'''
  comments = cli.field_comments(source)
  assert comments == {"seed": "the seed", "s": "Heading of the section.", "s.a": "own",
                      "s.b": "A group.", "s.c": "A group.",
                      "s.d": "d's own and its second line", "s.e": ""}


def test_load_config_applies_overrides_and_names_unknown_fields():
  from farmer_jax import cli  # noqa: PLC0415 (in-process: no command line)
  path = os.path.join(REPO, "configs", "digits.py")
  config = cli.load_config(f"{path}:tiny", ["train.batch_size=8", "model.remat=dots_no_batch",
                                            "train.learning_rate=3e-4", "data.hflip=True"])
  assert config.train.batch_size == 8 and isinstance(config.train.batch_size, int)
  assert config.model.remat == "dots_no_batch"          # not a literal: taken as the string
  assert config.train.learning_rate == 3e-4 and config.data.hflip is True
  assert cli.load_config(f"{path}:tiny").train.batch_size == 16   # a fresh config each call
  with pytest.raises(ValueError, match=r"config\.train\.lr.*did you mean config\.train\."
                                       r"learning_rate"):
    cli.load_config(f"{path}:tiny", ["train.lr=1e-3"])
  with pytest.raises(ValueError, match="field=value"):
    cli.load_config(f"{path}:tiny", ["train.batch_size"])
  with pytest.raises(FileNotFoundError):
    cli.load_config(os.path.join(REPO, "configs", "nope.py"))
