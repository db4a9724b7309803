"""Prompt files: one TOML file per rewriting strategy in prompts/ (or any path a user gives).

Layouts (render.layout): `document_last` reads each file's `template` (instruction, then the document);
`document_first` reads the prompt's document-first form from its own file beside it,
`<folder>/document_first/<stem>.toml` (keys `name`, `template`, optional `notes`), whose template starts
with the document and ends with the instruction ("Rewrite the document above as ...").
"""
from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

from engine.config.run_config import DOCUMENT_FIRST, DOCUMENT_LAST
from engine.errors import PromptError
from engine.types import ENGINE_DIRS

PLACEHOLDER = "{document}"
PROMPTS_DIR = Path(__file__).resolve().parents[2] / "prompts"
REQUIRED = ("name", "origin", "intent", "template", "max_new_tokens")


@dataclass(frozen=True)
class Prompt:
    name: str
    origin: str
    intent: str
    template: str
    max_new_tokens: int
    notes: str = ""
    recommended: bool = False
    path: str = ""
    layout: str = DOCUMENT_LAST  # document_first: `template` is the file's document-first form (module doc)

    @property
    def instruction(self) -> str:
        """The instruction: the template without the document (before it, or after it in document_first)."""
        before, after = self.template.split(PLACEHOLDER)
        return after if self.layout == DOCUMENT_FIRST else before

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.template.encode()).hexdigest()[:16]


def validate_template(template: str, where: str, layout: str = DOCUMENT_LAST) -> None:
    count = template.count(PLACEHOLDER)
    if count != 1:
        raise PromptError(f"{where}: the template must hold the placeholder {PLACEHOLDER} exactly once (found {count})")
    if layout == DOCUMENT_FIRST:
        if not template.startswith(PLACEHOLDER):
            raise PromptError(f"{where}: a document-first template starts with {PLACEHOLDER} (the document, then "
                              "the instruction), so that every prompt of a document shares its prefix")
        if not template[len(PLACEHOLDER):].strip():
            raise PromptError(f"{where}: the template has no instruction after {PLACEHOLDER}")
        return
    if template[template.index(PLACEHOLDER) + len(PLACEHOLDER):].strip():
        raise PromptError(f"{where}: the placeholder {PLACEHOLDER} must come last (instruction first, document last)")
    if not template[: template.index(PLACEHOLDER)].strip():
        raise PromptError(f"{where}: the template has no instruction before {PLACEHOLDER}")


def load_prompt_file(path: Path) -> Prompt:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PromptError(f"prompt file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PromptError(f"{path}: not valid TOML: {exc}") from None
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise PromptError(f"{path}: missing key(s) {', '.join(missing)} (a prompt file needs {', '.join(REQUIRED)}; "
                          f"optional: notes, recommended)")
    unknown = set(data) - set(REQUIRED) - {"notes", "recommended"}
    if unknown:
        raise PromptError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
    template = data["template"].rstrip()
    validate_template(template, str(path))
    if not isinstance(data["max_new_tokens"], int) or data["max_new_tokens"] < 1:
        raise PromptError(f"{path}: max_new_tokens must be a positive integer")
    return Prompt(
        name=str(data["name"]), origin=str(data["origin"]), intent=str(data["intent"]),
        template=template, max_new_tokens=data["max_new_tokens"], notes=str(data.get("notes", "")).strip(),
        recommended=bool(data.get("recommended", False)), path=str(path),
    )


def document_first_path(base: Path) -> Path:
    return base.parent / DOCUMENT_FIRST / base.name


def document_first(prompt: Prompt) -> Prompt:
    """The prompt's document-first form, from its own file (module doc); a prompt without one is an error
    that names it and the file expected."""
    path = document_first_path(Path(prompt.path))
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PromptError(f"prompt {prompt.name!r} has no document-first form (render.layout = "
                          f"\"document_first\"): write {path} (keys name, template, optional notes; the template "
                          f"starts with {PLACEHOLDER}), or use render.layout = \"document_last\"") from None
    except tomllib.TOMLDecodeError as exc:
        raise PromptError(f"{path}: not valid TOML: {exc}") from None
    if "template" not in data or data.get("name") != prompt.name:
        raise PromptError(f"{path}: a document-first form needs the keys name (= {prompt.name!r}, its prompt's) "
                          "and template")
    unknown = set(data) - {"name", "template", "notes"}
    if unknown:
        raise PromptError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} (a document-first form has "
                          "name, template, notes; the rest comes from the prompt's own file)")
    template = str(data["template"]).rstrip()
    validate_template(template, str(path), DOCUMENT_FIRST)
    return replace(prompt, template=template, layout=DOCUMENT_FIRST, path=str(path),
                   notes=str(data.get("notes", prompt.notes)).strip())


def available() -> list[str]:
    return sorted(p.stem for p in PROMPTS_DIR.glob("*.toml"))


def load_prompt(name_or_path: str) -> Prompt:
    """A prompt by name (prompts/NAME.toml) or by the path of a user's own prompt file."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or "/" in name_or_path:
        return load_prompt_file(path)
    candidate = PROMPTS_DIR / f"{name_or_path}.toml"
    if not candidate.exists():
        raise PromptError(f"unknown prompt {name_or_path!r}; available: {', '.join(available())} "
                          "(or give a .toml path)")
    return load_prompt_file(candidate)


def load_prompts(names: list[str], layout: str = DOCUMENT_LAST) -> list[Prompt]:
    prompts = [load_prompt(n) for n in names]
    if layout == DOCUMENT_FIRST:
        prompts = [document_first(p) for p in prompts]
    seen: set[str] = set()
    for p in prompts:
        if p.name in ENGINE_DIRS or p.name.startswith("_") or "/" in p.name:
            raise PromptError(f"prompt name {p.name!r} is reserved or not a folder name; rename it in {p.path}")
        if p.name in seen:
            raise PromptError(f"prompt name {p.name!r} is used twice in this run")
        seen.add(p.name)
    return prompts
