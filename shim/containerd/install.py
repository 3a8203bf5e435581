"""Register the thaw handler: write the drop-in, make the main config import it.

Everything is computed and checked before a file is written; what containerd then loads must
have the handler (our model, then `containerd config dump`), else every file is put back.
The main config is edited with tomlkit, which keeps the user's formatting: comments, quoting,
spacing, key order. We check that it did: the old text must still be there byte for byte (the
edit only inserts) and the new text must read as the old plus the one `imports` entry.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import subprocess
import tomllib
from collections.abc import Callable
from typing import Any

import tomlkit
import tomlkit.exceptions
from tomlkit.items import Array, Whitespace

from thaw.oci.files import atomic_write

from . import ContainerdConfigError, checks, dropin
from .discovery import containerd_version, default_config
from .merge import covered, cri_disabled, cri_plugin, dig, effective, load_files, runtimes_of

Say = Callable[[str], object]  # where install and uninstall tell what they do (print, by default)

# Next to the drop-in (not *.toml: containerd never reads it): the imports entry install added.
RECORD_NAME = ".thaw-import.json"


def _only_inserts(old: str, new: str) -> bool:
    """Every character of `old` is still in `new`, in order."""
    rest = iter(new)
    return all(c in rest for c in old)


def add_import(text: str, entry: str) -> str:
    """`text` with `entry` appended to its top-level `imports` array, or with a new
    `imports = [entry]` line after its top-level keys."""
    try:
        old = tomllib.loads(text)
        doc = tomlkit.parse(text)
    except (tomllib.TOMLDecodeError, tomlkit.exceptions.TOMLKitError) as exc:
        raise ContainerdConfigError(f"not valid TOML: {exc}") from None
    if "imports" in old:
        imports = doc["imports"]
        if not isinstance(imports, Array):
            raise ContainerdConfigError("its `imports` is not an array: cannot edit it automatically")
        imports.append(entry)
    else:
        # tomlkit puts a new top-level key after the last one and may give the table that follows
        # a blank line: keep the file's own spacing and line ending.
        indents = [(item, item.trivia.indent) for _, item in doc.body if not isinstance(item, Whitespace)]
        line = tomlkit.array()
        line.append(entry)
        line.trivia.trail = "\r\n" if "\r\n" in text else "\n"
        doc.append("imports", line)
        for item, indent in indents:
            item.trivia.indent = indent
    new = tomlkit.dumps(doc)
    want = {**old, "imports": [*(old.get("imports") or []), entry]}
    try:
        got = tomllib.loads(new)
    except tomllib.TOMLDecodeError as exc:
        raise ContainerdConfigError(f"adding the imports entry would break the file ({exc})") from None
    if got != want or not _only_inserts(text, new):
        raise ContainerdConfigError("adding the imports entry would change other parts of the file")
    return new


def remove_import(text: str, entry: str) -> str | None:
    """`text` without `entry` in its top-level `imports` (the key itself goes when that leaves it
    empty); None when it has no such entry. Only that entry's text goes: the rest stays as is."""
    try:
        old = tomllib.loads(text)
        doc = tomlkit.parse(text)
    except (tomllib.TOMLDecodeError, tomlkit.exceptions.TOMLKitError) as exc:
        raise ContainerdConfigError(f"not valid TOML: {exc}") from None
    imports = doc.get("imports")
    if not isinstance(imports, Array) or entry not in list(old.get("imports") or []):
        return None
    del imports[list(old["imports"]).index(entry)]
    rest = [e for e in old["imports"] if e != entry] + [entry] * (old["imports"].count(entry) - 1)
    if not len(imports):
        del doc["imports"]
    new = tomlkit.dumps(doc)
    want = {**old, "imports": rest} if rest else {k: v for k, v in old.items() if k != "imports"}
    try:
        got = tomllib.loads(new)
    except tomllib.TOMLDecodeError as exc:
        raise ContainerdConfigError(f"removing the imports entry would break the file ({exc})") from None
    if got != want or not _only_inserts(new, text):
        raise ContainerdConfigError("removing the imports entry would change other parts of the file")
    return new


def uninstall(main: str, conf_d: str, say: Say = print) -> bool:
    """Undo `install`: remove the drop-in and the `imports` entry thaw added (recorded in
    RECORD_NAME by install; an entry the user had, or one that now also pulls in other files of
    conf_d, stays). Returns whether a file changed."""
    drop_in = os.path.join(conf_d, dropin.DROP_IN_NAME)
    record_path = os.path.join(conf_d, RECORD_NAME)
    try:
        with open(record_path) as f:
            record = json.load(f)
    except FileNotFoundError:
        record = None
    except (OSError, ValueError) as exc:
        raise ContainerdConfigError(f"{record_path}: {exc}") from None
    changed = False
    if record and os.path.exists(record.get("main", main)):
        main, entry = record.get("main", main), record["entry"]
        others = sorted(p for p in glob.glob(entry) if p != drop_in)
        text = _read(main)
        if others:
            say(f"main config: keeping {entry} in the imports of {main}: it also imports {', '.join(others)}")
        else:
            new = remove_import(text, entry)
            if new is None:
                say(f"main config: {main} no longer imports {entry}")
            else:
                target = os.path.realpath(main)
                _backup(main, text, os.stat(target).st_mode & 0o7777, say)
                atomic_write(target, new.encode(), mode=os.stat(target).st_mode & 0o7777)
                say(f"main config: removed {entry} from the imports of {main} (nothing else changed)")
                changed = True
    elif not record:
        say(f"main config: thaw added no imports entry (no {record_path}): left as is")
    if os.path.exists(drop_in):
        os.unlink(drop_in)
        say(f"drop-in: removed {drop_in}")
        changed = True
    _unlink(record_path)
    return changed


def _main_config_change(main: str, main_text: str | None, main_cfg: dict[str, Any], entry: str,
                        drop_in: str, layout: int) -> tuple[str | None, str]:
    """The main config's new text (None: unchanged) and what happens to it, in words."""
    if main_cfg and covered(main, main_cfg.get("imports") or [], drop_in):
        return None, f"{main} already imports {drop_in}"
    if not main_cfg or main_text is None:
        # absent, empty or comments only: containerd runs on its defaults; say so explicitly
        head = main_text or ("# containerd config written by thaw's install/containerd.sh: containerd's defaults\n"
                             "# plus the files imported below.\n")
        head += "" if head.endswith("\n") else "\n"
        note = f"{'filled empty' if main_text is not None else 'created'} {main} (version = {layout}, imports {entry})"
        return head + tomlkit.dumps({"version": layout, "imports": [entry]}), note
    try:
        return add_import(main_text, entry), f"added {entry} to the top-level imports of {main} (nothing else changed)"
    except ContainerdConfigError as exc:
        raise ContainerdConfigError(f"{main}: {exc}; add {entry!r} to its top-level imports by hand") from None


def install(main: str, conf_d: str, containerd_bin: str, binary: str = dropin.DEFAULT_BINARY,
            say: Say = print) -> bool:
    """Register the thaw handler: write the drop-in, make the main config import it.
    Returns whether a file changed. Raises ContainerdConfigError when it cannot be done safely;
    then nothing is left changed."""
    version = containerd_version(containerd_bin)
    if version is None:
        raise ContainerdConfigError(f"cannot run `{containerd_bin} --version`")
    major = version[0]
    drop_in = os.path.join(conf_d, dropin.DROP_IN_NAME)
    main_text = _read(main) if os.path.exists(main) else None
    try:
        main_cfg = tomllib.loads(main_text or "")
    except tomllib.TOMLDecodeError as exc:
        raise ContainerdConfigError(f"{main}: not valid TOML: {exc}") from None
    layout = dropin.layout_for(version, main_cfg)
    say(f"containerd {'.'.join(map(str, version))}: config version {layout}, "
        f"runtimes under plugins.\"{cri_plugin(layout)}\"")
    if not os.access(binary, os.X_OK):
        say(f"warning: {binary} is not an executable file yet (install/node.sh installs it)")

    # The main config imports the drop-in directory: a glob, so that deleting the drop-in can
    # never stop containerd from starting.
    entry = os.path.join(conf_d, "*.toml")
    new_main, main_note = _main_config_change(main, main_text, main_cfg, entry, drop_in, layout)

    # The drop-in is built from everything else containerd will load, the new imports included.
    before = {p for p, _ in load_files(main, exclude=(drop_in,))}
    source = load_files(main, exclude=(drop_in,),
                        main_cfg=tomllib.loads(new_main) if new_main is not None else main_cfg)
    for path, _ in source:
        if path not in before:
            say(f"note: containerd will now also load {path} (it matches {entry})")
    if cri_disabled(effective(source, major)[0]):
        say(f"warning: the CRI plugin is disabled (disabled_plugins in {main}): Kubernetes cannot use "
            f"this containerd; the handler is registered anyway")
    data = dropin.build(source, layout, major, binary, default_config(containerd_bin))
    text = dropin.render(data, layout, main)
    if tomllib.loads(text) != data:
        raise ContainerdConfigError("internal error: the drop-in does not read back as written")
    old_drop_in = _read(drop_in) if os.path.exists(drop_in) else None

    written: list[tuple[str, str | None, int]] = []     # (path, previous text or None, mode)
    try:
        if old_drop_in is not None and _reads_as(old_drop_in, data):
            say(f"drop-in: {drop_in} is up to date")
        else:
            os.makedirs(conf_d, mode=0o755, exist_ok=True)
            written.append((drop_in, old_drop_in, 0o644))
            atomic_write(drop_in, text.encode(), mode=0o644)
            say(f"drop-in: {'updated' if old_drop_in is not None else 'wrote'} {drop_in} "
                f"(handler {dropin.HANDLER}: {dropin.RUNTIME_TYPE}, BinaryName={binary}, "
                f"annotations {dropin.ANNOTATIONS})")
        if new_main is not None:
            # through a symlinked config.toml to the file it points at
            target = os.path.realpath(main) if main_text is not None else main
            mode = os.stat(target).st_mode & 0o7777 if main_text is not None else 0o644
            if main_text is not None:
                _backup(main, main_text, mode, say)
            else:
                os.makedirs(os.path.dirname(os.path.abspath(main)), mode=0o755, exist_ok=True)
            written.append((target, main_text, mode))
            atomic_write(target, new_main.encode(), mode=mode)
            # what uninstall may take out again (and nothing else)
            record = os.path.join(conf_d, RECORD_NAME)
            os.makedirs(conf_d, mode=0o755, exist_ok=True)
            written.append((record, _read(record) if os.path.exists(record) else None, 0o644))
            atomic_write(record, json.dumps({"main": main, "entry": entry}).encode(), mode=0o644)
        say(f"main config: {main_note}")
        # What containerd loads now must have the handler, whatever the other imports do...
        problems = [d for ok, _, d in checks.registration_checks(main, major) if not ok]
        if problems:
            raise ContainerdConfigError("after writing, the handler is still not right: " + "; ".join(problems))
        # ...and containerd itself must accept it.
        _containerd_accepts(containerd_bin, main, binary)
    except BaseException:
        if written:
            say("rolling back: restoring the previous files")
        for path, previous, mode in reversed(written):
            if previous is None:
                _unlink(path)
            else:
                atomic_write(path, previous.encode(), mode=mode)
        raise
    return bool(written)


def _reads_as(text: str, data: dict[str, Any]) -> bool:
    try:
        return tomllib.loads(text) == data
    except tomllib.TOMLDecodeError:
        return False


def _read(path: str) -> str:
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _backup(main: str, text: str, mode: int, say: Say) -> None:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = f"{main}.thaw-backup-{stamp}"
    n = 1
    while os.path.exists(path):
        n += 1
        path = f"{main}.thaw-backup-{stamp}.{n}"
    atomic_write(path, text.encode(), mode=mode)
    say(f"main config: backed up {main} to {path}")


def _containerd_accepts(containerd_bin: str, main: str, binary: str) -> None:
    """`containerd --config MAIN config dump` must succeed and, when it prints a config, show
    the handler (the dump is containerd's own merge of the main config and its imports)."""
    try:
        proc = subprocess.run([containerd_bin, "--config", main, "config", "dump"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ContainerdConfigError(f"containerd config dump: {exc}") from None
    if proc.returncode != 0:
        raise ContainerdConfigError(f"containerd rejects the config: {(proc.stderr or proc.stdout).strip()[-800:]}")
    try:
        dumped = tomllib.loads(proc.stdout)
    except tomllib.TOMLDecodeError:
        return
    if not dumped.get("plugins"):
        return
    entry = runtimes_of(dumped, 2).get(dropin.HANDLER) or runtimes_of(dumped, 3).get(dropin.HANDLER)
    if not isinstance(entry, dict) or dig(entry, "options", "BinaryName") != binary:
        raise ContainerdConfigError("`containerd config dump` does not show the thaw handler")
