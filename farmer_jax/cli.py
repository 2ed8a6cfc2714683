"""The command line's own behaviour: help, one-line errors for bad flags and configs, field listing.

A mistake on the command line (an unknown or mistyped config field, a value of the wrong type, a
missing config file or variant, an invalid value) is the user's to fix, so it is reported as one
line naming the field, the value and the rule, `farmer_jax: ...`, with exit status 2 and no
traceback, before anything heavy runs. `--mode=fields` lists every config field with its value and
the source or meaning recorded in config_base.py's comments.
"""
import ast
import difflib
import importlib.util
import inspect
import pathlib
import re
import sys
import textwrap
import tokenize
from typing import Any, Callable, Iterable, NoReturn, Sequence

from absl import flags
import ml_collections
from ml_collections.config_flags import config_path

from farmer_jax import config_base, config_check

PROG = "farmer_jax"
EXIT_USAGE = 2                                   # the shells' and argparse's code for bad usage
HELP_FLAGS = ("help", "helpshort", "helpfull", "h", "?")
_FALSE = ("false", "0", "no", "f", "n")


def fail(message: str) -> NoReturn:
  """Prints `farmer_jax: <message>` as one line on stderr and exits 2."""
  sys.stderr.write(f"{PROG}: {one_line(message)}\n")
  sys.stderr.flush()
  raise SystemExit(EXIT_USAGE)


def one_line(message: str) -> str:
  """The gist of a possibly multi-line message: the exception line of an embedded traceback,
  else its lines joined."""
  lines = [line.strip() for line in str(message).splitlines() if line.strip()]
  if any(line.startswith("Traceback") for line in lines):
    lines = lines[-1:]
    lines[0] = re.sub(r"^\w+(Error|Exception): ", "", lines[0])
  return " ".join(lines)


# Flags parsing.

def _flag_args(argv: Sequence[str]) -> list[str]:
  """The arguments absl reads as flags: those before a bare `--`."""
  args = list(argv[1:])
  return args[:args.index("--")] if "--" in args else args


def wants_help(argv: Sequence[str]) -> bool:
  for arg in _flag_args(argv):
    if not arg.startswith("-"):
      continue
    name, _, value = arg.lstrip("-").partition("=")
    if name in HELP_FLAGS and value.lower() not in _FALSE:
      return True
  return False


def _config_spec(argv: Sequence[str], name: str) -> str | None:
  """The last `--<name>=SPEC` (or `--<name> SPEC`) of argv."""
  args, spec = _flag_args(argv), None
  for i, arg in enumerate(args):
    m = re.match(rf"^-{{1,2}}{re.escape(name)}(=|$)", arg)
    if m:
      spec = arg[m.end():] if m.group(1) else (args[i + 1] if i + 1 < len(args) else None)
  return spec


def _override_paths(argv: Sequence[str], name: str) -> list[str]:
  """Field paths of the `--<name>.a.b=V` / `--[no]<name>.a.b` overrides, as ml_collections reads
  them."""
  paths = []
  for arg in _flag_args(argv):
    if re.match(rf"^-{{1,2}}(no)?{re.escape(name)}\.", arg):
      paths.append(arg.split("=", 1)[0].split(".", 1)[1])
  return paths


def load_config(spec: str, overrides: Sequence[str] = ()) -> Any:
  """`path[:arg]` -> the file's get_config(arg), as the config flag loads it; raises what it
  raises (OSError for a missing file).

  `overrides`: `a.b=VALUE` items (the benchmarks' `--set`), applied in order; VALUE is read as a
  Python literal (1e-3, True, "x", (1, 2)), else taken as the string it is (dots_no_batch). A
  field the config does not have raises ValueError with the command line's one-line message.
  """
  path, sep, arg = spec.partition(":")
  if not pathlib.Path(path).is_file():
    raise FileNotFoundError(path)
  module_spec = importlib.util.spec_from_file_location(f"{PROG}_cli_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if sep else module.get_config()
  for item in overrides:
    field, eq, text = item.partition("=")
    if not eq:
      raise ValueError(f"{item!r}: an override is field=value, e.g. train.batch_size=32")
    holder, name, problem = _walk(config, field.strip())
    if problem:
      raise ValueError(problem)
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    holder[name] = value
  return config


def add_config_arguments(parser, default: str | None = None) -> None:
  """`--config=FILE[:ARG]` (required without `default`) and repeatable `--set a.b=VALUE` on an
  argparse parser: the benchmarks' way to name a config; `load_config(args.config, args.set)`
  reads them."""
  parser.add_argument("--config", required=default is None, default=default,
                      help="FILE[:ARG]: a get_config() file and its variant")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override a config field, e.g. --set train.batch_size=32 (repeatable)")


def _missing_file_message(flag: str, spec: str) -> str:
  path = spec.partition(":")[0]
  if not path:
    return f"--{flag}={spec}: no config file given (e.g. --{flag}=configs/digits.py:tiny)"
  config_file = pathlib.Path(path)   # a local Python file, imported: never a workdir path
  folder = config_file.parent
  near = sorted(str(p) for p in folder.glob("*.py")) if str(folder) != "." else []
  hint = f" (there: {', '.join(near)})" if near and len(near) <= 12 else ""
  where = f" from {pathlib.Path.cwd()}" if not config_file.is_absolute() else ""
  return f"--{flag}={spec}: no such config file {path!r}{where}{hint}"


def _walk(config: Any, path: str) -> tuple[Any, str, str | None]:
  """(holder, last field, problem): follows `path` (a.b.c or a.b[0]) through the config; problem
  is None when every step exists, else the one-line complaint about the first that does not."""
  parts = config_path.split(path)
  holder, done = config, []
  for i, part in enumerate(parts):
    last = i == len(parts) - 1
    if isinstance(holder, (ml_collections.ConfigDict, dict)):
      if part not in holder:
        return holder, part, _unknown_message(done, str(part), holder)
    elif isinstance(holder, (list, tuple)) and isinstance(part, int):
      if not -len(holder) <= part < len(holder):
        where = "config." + ".".join(map(str, done))
        return holder, part, f"{where}[{part}] is out of range: it has {len(holder)} entries"
    else:
      where = "config." + ".".join(map(str, done))
      return holder, part, (f"{where} is not a section: it holds {holder!r}, which has no field "
                            f"{part!r}")
    if not last:
      holder = holder[part]
      done.append(part)
  return holder, parts[-1], None


def _abbreviated(name: str, known: Iterable[str]) -> list[str]:
  """Known names that `name` abbreviates: their initials (lr: learning_rate), a prefix (warmup:
  warmup_steps) or one of their words (steps: num_steps)."""
  name = name.lower()
  hits = []
  for k in known:
    words = k.lower().split("_")
    if len(name) >= 2 and (name == "".join(w[0] for w in words if w) or name in words
                           or (len(name) >= 3 and k.lower().startswith(name))):
      hits.append(k)
  return hits[:3]


def _unknown_message(done: list, name: str, holder) -> str:
  """config_check's message where it knows the section, the same from the config's keys elsewhere
  (model, nested dicts); both also suggest the names that `name` abbreviates, which difflib's
  spelling distance misses (lr for learning_rate)."""
  where = "config." + ".".join(map(str, done)) if done else "config"
  known = sorted(map(str, holder.keys()))
  if not done or (len(done) == 1 and done[0] in config_check.SECTIONS):
    message = config_check.unknown_field_message(done[0] if done else "", name)
    if "did you mean" in message or not _abbreviated(name, known):
      return message
  close = difflib.get_close_matches(name, known, n=3, cutoff=0.5) or _abbreviated(name, known)
  hint = (f"did you mean {' or '.join(f'{where}.{c}' for c in close)}?" if close
          else f"known: {', '.join(known)}")
  return (f"{where}.{name} is not a config field; {hint} "
          f"(python -m farmer_jax.main --mode=fields lists them all)")


def _type_name(holder, field) -> str | None:
  try:
    t = holder.get_type(field) if isinstance(holder, ml_collections.ConfigDict) else type(
        holder[field])
  except Exception:  # noqa: BLE001 (only a hint)
    return None
  return None if t is type(None) else getattr(t, "__name__", str(t))


def config_error_message(argv: Sequence[str], error: BaseException | None,
                         name: str = "config") -> str:
  """What went wrong with the config on this command line, in one line naming the field.

  absl and ml_collections report an unknown override as a bare AttributeError('lr') and a failing
  get_config() as a traceback inside a flags error, so the config is loaded again here (only on
  this error path) to name the file, the variant or the field."""
  spec = _config_spec(argv, name)
  if spec is not None:
    try:
      config = load_config(spec)
    except FileNotFoundError:
      return _missing_file_message(name, spec)
    except Exception as e:  # noqa: BLE001 (whatever the config file raises is the user's)
      return f"--{name}={spec}: {one_line(str(e) or type(e).__name__)}"
    for path in _override_paths(argv, name):
      try:
        _, _, problem = _walk(config, path)
      except Exception as e:  # noqa: BLE001 (an unparsable path)
        problem = f"--{name}.{path}: {one_line(str(e))}"
      if problem:
        return problem
    m = re.match(rf"flag --{re.escape(name)}\.(\S+?)=(.*?): (.*)", one_line(str(error or "")),
                 re.S)
    if m:   # a value the field's parser rejects (its type)
      path, value, why = m.groups()
      holder, field, _ = _walk(config, path)
      expected = _type_name(holder, field)
      if expected == "bool":
        return f"config.{path} = {value!r}: must be true or false"
      rule = f"must be {'an' if expected and expected[0] in 'aeiou' else 'a'} {expected}" if (
          expected) else "rejected"
      return f"config.{path} = {value!r}: {rule} ({why})"
  if error is None:
    return f"--{name}: the config could not be loaded"
  text = one_line(str(error)) or type(error).__name__
  return re.sub(r"^FATAL Flags parsing error: ", "", text)


def flags_parser(usage: Callable[[], str], config_flag: str = "config"
                 ) -> Callable[[list[str]], list[str]]:
  """An `absl.app.run(flags_parser=...)`: absl's parsing, with our help on --help / -h /
  --helpfull (exit 0) and one line, exit 2, for any error in the flags or the config."""
  def parse(argv: list[str]) -> list[str]:
    if wants_help(argv):
      sys.stdout.write(usage())
      sys.stdout.flush()
      raise SystemExit(0)
    try:
      rest = flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 (every parsing failure is a command-line mistake)
      fail(config_error_message(argv, e, config_flag))
    value = flags.FLAGS[config_flag].value
    if value is not None and not isinstance(value, ml_collections.ConfigDict):
      # ml_collections defers a failed load (a missing file) to the first access of the config.
      fail(config_error_message(argv, None, config_flag))
    return rest
  return parse


def usage_text(modes: dict[str, str], flag_holders: Iterable[Any]) -> str:
  """The --help text: synopsis, modes, this program's flags, config overrides."""
  lines = [
      "usage: python -m farmer_jax.main --config=configs/X.py[:VARIANT] --workdir=DIR "
      "[--mode=MODE] [--config.SECTION.FIELD=VALUE ...]",
      "",
      "Modes (--mode, default train):",
  ]
  width = max(map(len, modes))
  lines += [f"  {m:<{width}}  {text}" for m, text in modes.items()]
  lines += ["", "Flags:"]
  for holder in flag_holders:
    flag = flags.FLAGS[holder.name]
    lines.append(f"  --{flag.name}")
    lines += textwrap.wrap(one_line(flag.help), 100, initial_indent=" " * 6,
                           subsequent_indent=" " * 6)
  lines += [
      "",
      "Config fields:",
      "  Override any field of the config: --config.SECTION.FIELD=VALUE, e.g.",
      "    --config.train.num_steps=100 --config.sharding.mesh.fsdp=8 --config.data.hflip=false",
      "  List every field with its value and source (no --workdir needed):",
      "    python -m farmer_jax.main --mode=fields [--config=configs/X.py[:VARIANT]]",
      "  A config problem stops the run before any compute with one line naming the field "
      "(exit 2).",
      "",
      "More: the docstring of farmer_jax/main.py, docs/, and configs/*.py for their variants.",
      "",
  ]
  return "\n".join(lines)


# The field listing.

def _comments(source: str) -> tuple[dict[int, str], dict[int, tuple[int, str]]]:
  """(trailing comment of each code line, (column, text) of each comment-only line), by line."""
  trailing, alone = {}, {}
  lines = source.splitlines()
  readline = iter(source.splitlines(keepends=True)).__next__
  for tok in tokenize.generate_tokens(readline):
    if tok.type != tokenize.COMMENT:
      continue
    row, col = tok.start
    text = tok.string.lstrip("#").strip()
    if lines[row - 1][:col].strip():
      trailing[row] = text
    else:
      alone[row] = (col, text)
  return trailing, alone


def _base_config_fields(tree: ast.Module):
  """(section, name, node) of each field base_config() sets, in order: section "" for top-level
  fields, name "" for a section's `c.<section> = dict(...)` itself."""
  func = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "base_config")
  for stmt in func.body:
    if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
            and isinstance(stmt.targets[0], ast.Attribute)):
      continue
    name, value = stmt.targets[0].attr, stmt.value
    if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "dict":
      yield name, "", stmt
      for kw in value.keywords:
        yield name, kw.arg, kw
    else:
      yield "", name, stmt


def field_comments(source: str | None = None) -> dict[str, str]:
  """"section.field" ("field" at the top level, "section" for a section itself) -> the source or
  meaning that config_base.base_config() records in its comments ("" if none), in its order.

  A field's own comment is the one on its line, with the comment-only lines indented under it. A
  comment block directly above a field describes it, or heads a group: it then also describes
  the fields after it that have no comment of their own, up to the next one that has."""
  source = source if source is not None else inspect.getsource(config_base)
  trailing, alone = _comments(source)

  def above(line: int, col: int) -> str:
    block = []
    while line - 1 in alone and alone[line - 1][0] == col:
      line -= 1
      block.insert(0, alone[line][1])
    return " ".join(block)

  def own(first: int, last: int, col: int) -> str:
    texts = [trailing[r] for r in range(first, last + 1) if r in trailing]
    row = last + 1
    while texts and row in alone and alone[row][0] > col:
      texts.append(alone[row][1])
      row += 1
    return " ".join(dict.fromkeys(texts))

  out: dict[str, str] = {}
  heading = ""
  for section, name, node in _base_config_fields(ast.parse(source)):
    group = above(node.lineno, node.col_offset)
    if not name:   # a section: its heading, not its fields'
      out[section], heading = group, ""
      continue
    text = own(node.lineno, node.end_lineno, node.col_offset)
    heading = group or heading
    out[f"{section}.{name}" if section else name] = (
        f"{group} {text}" if group and text else text or heading)
    if text:
      heading = ""
  return out


def _leaves(config, prefix: str = ""):
  """(path, holder, key) of every field, nested ConfigDicts flattened (sharding.mesh.data)."""
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", config, key


def _show(holder, key) -> str:
  value = holder[key]
  if value is None:   # a placeholder's type says what an override may set
    t = _type_name(holder, key)
    return f"None ({t})" if t else "None"
  return repr(value)


def list_fields(config: ml_collections.ConfigDict, comments: dict[str, str] | None = None
                ) -> list[str]:
  """`[section]` headings, then one line per field: `section.field = value  # source or meaning`.
  Top-level fields first, then sections and fields in config_base.py's order (any others after)."""
  comments = field_comments() if comments is None else comments
  rank = {path: i for i, path in enumerate(comments)}
  # sharding.mesh.data is ranked and described as sharding.mesh.
  outer = lambda path: ".".join(path.split(".")[:2])
  rows = {path: (_show(holder, key), comments.get(path) or comments.get(outer(path), ""))
          for path, holder, key in _leaves(config)}
  groups: dict[str, list[str]] = {}
  for path in rows:
    groups.setdefault(path.split(".")[0] if "." in path else "", []).append(path)
  width = max(map(len, rows))
  vwidth = min(24, max(len(value) for value, _ in rows.values()))
  lines = []
  for section in sorted(groups, key=lambda s: (s != "", rank.get(s, len(rank)), s)):
    note = comments.get(section, "")
    lines.append(f"[{section or 'top level'}]" + (f"  # {note}" if note else ""))
    for path in sorted(groups[section], key=lambda p: (rank.get(outer(p), len(rank)), p)):
      value, text = rows[path]
      line = f"  {path:<{width}} = {value:<{vwidth}}"
      lines.append((f"{line}  # {text}" if text else line).rstrip())
    lines.append("")
  return lines[:-1]
