"""Recipes: YAML grouped by concern, validated key by key, with line numbers in every error.

A recipe is loaded in four steps, each a small function below:
  1. `_read_yaml` parses a file into plain data plus a map from key path to line number;
  2. `extends:` is followed (cycles refused) and the parent's data deep-merged under the child's;
  3. `--set a.b=c` overrides are applied, then `${ENV}` / `${ENV:-default}` are expanded in strings;
  4. pydantic validates the result; every problem becomes one `file:line: field: reason` line,
     unknown keys with a "did you mean" (or the section the key belongs in).

This module imports no torch, so `validate` and `preview` start fast.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .errors import LorachatError, RecipeError, Where


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Base(_Section):
    model: str = Field(description="Hub id (e.g. HuggingFaceTB/SmolLM2-135M-Instruct) or a local directory.")
    revision: str = Field("main", description="Hub revision: branch, tag or commit.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Compute dtype; auto = bfloat16 where the hardware runs it fast, else float32."
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="4bit = QLoRA (nf4 + double quantization, bitsandbytes)."
    )
    trust_remote_code: bool = Field(False, description="Run code shipped with the model; never on implicitly.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel; auto = PyTorch SDPA. flash_attention_2 needs CUDA and flash-attn."
    )
    adapter: str | None = Field(
        None, description="An adapter directory to start from (e.g. an SFT adapter for training.method: dpo); its "
                          "weights are the trainable starting point and its lora settings win over the lora section.")


class Template(_Section):
    name: str = Field(
        "auto", description="auto = the tokenizer's own template; or a built-in (chatml, llama3, mistral, ...)."
    )
    file: str | None = Field(None, description="A .jinja file, relative to the recipe; overrides `name`.")
    system: str | None = Field(None, description="Default system prompt for conversations that have none.")
    add_special_tokens: Literal["auto", False] = Field(
        "auto", description="auto: the template's markers (e.g. ChatML's <|im_start|>) that are not single tokens "
        "of the base are added as special tokens and only their embedding rows are trained; false: keep them as "
        "text pieces.")


PERSONA = "Your persona:\n{persona}"  # PersonaChat's default system message (ParlAI writes "your persona: ...")


class Source(_Section):
    path: str = Field(
        description="A local .jsonl/.json/.csv/.parquet file (relative to the recipe), "
        "`pkg:DIST/path/in/package` for a file shipped in an installed package, or `hf:DATASET_ID`."
    )
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "dailydialog", "personachat",
                    "multiwoz", "preference"] = Field(
        "auto", description="Row format; auto detects it from the first row and says what it found."
    )
    weight: float = Field(1.0, gt=0, description="Sampling weight when mixing sources (1.0 = each row once).")
    split: str = Field("train", description="Split name, for `hf:` datasets and for a .json object holding one "
                       "list per split (PersonaChat's {train: [...], valid: [...]}).")
    name: str | None = Field(None, description="Dataset config name, for `hf:` datasets.")
    # Options of the dialogue-corpus formats (data/formats.py).
    roles: tuple[Literal["user", "assistant"], Literal["user", "assistant"]] | None = Field(
        None, description="dailydialog, multiwoz, turns: the roles of the first and second speaker "
        "(default [user, assistant]: the second speaker, MultiWOZ's SYSTEM, is the one trained).")
    domains: list[str] | None = Field(
        None, min_length=1, description="Keep only conversations with one of these domains (multiwoz: "
        "attraction, hospital, hotel, police, restaurant, taxi, train).")
    persona: str | Literal[False] = Field(
        PERSONA, description="personachat: the system message made of the persona sentences, {persona} "
        "standing for them (one per line); false leaves the persona out.")

    @field_validator("roles")
    @classmethod
    def _two_roles(cls, roles: tuple[str, str] | None) -> tuple[str, str] | None:
        if roles is not None and roles[0] == roles[1]:
            raise PydanticCustomError("roles", "the two speakers need different roles, e.g. [user, assistant]")
        return roles

    @field_validator("persona")
    @classmethod
    def _persona_slot(cls, persona: str | bool) -> str | bool:
        if isinstance(persona, str) and "{persona}" not in persona:
            raise PydanticCustomError("persona", "the wording must contain {persona}, where the sentences go "
                                                 "(or use false to leave the persona out)")
        return persona


class EvalSplit(_Section):
    split: float = Field(0.1, ge=0, lt=1, description="Share of the training rows held out for evaluation.")
    max_rows: int | None = Field(None, gt=0, description="Cap on held-out rows.")


class Data(_Section):
    train: list[Source] = Field(min_length=1, description="Training sources, mixed by weight.")
    eval: EvalSplit | list[Source] = Field(
        default_factory=EvalSplit, description="{split: 0.1} to hold out training rows, or a list of sources."
    )
    max_length: int = Field(1024, gt=8, description="Longest sample in tokens.")
    too_long: Literal["drop", "truncate", "error"] = Field("drop", description="What to do with longer samples.")
    train_on: Literal["assistant", "last_assistant", "all"] = Field(
        "assistant", description="Which tokens carry loss: every assistant reply, only the last one, or all."
    )
    dedup: Literal["off", "exact", "near"] = Field(
        "off", description="Drop duplicate conversations before the eval split, keeping the first: exact = the same "
        "text once case and whitespace are normalised; near = also near-duplicates (near_threshold); off = "
        "validate only reports them (docs/hygiene.md).")

    @field_validator("dedup", mode="before")
    @classmethod
    def _bare_off(cls, value: object) -> object:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false

    near_threshold: float = Field(
        0.8, gt=0, le=1, description="Similarity (MinHash estimate of the Jaccard of two conversations' words "
        "and word pieces, checked exactly near the threshold) from which they are near-duplicates, in (0, 1]; "
        "a conversation also is one when another holds (1 + threshold) / 2 of it (a sentence or a turn added).")
    language_filter: bool = Field(
        False, description="Drop conversations not in output.language (the router's language identifier); "
        "validate reports them either way.")
    pii: Literal["report", "mask", "drop"] = Field(
        "report", description="Personal data and secrets (emails, phone numbers, card numbers, IBANs, national "
        "ids, IP addresses, API keys): report = validate counts them; mask = typed placeholders such as <EMAIL> "
        "in what trains (your files are not changed); drop = leave those conversations out.")
    replay: float = Field(
        0.0, ge=0, lt=1, description="Share of the training rows drawn from the general set in output.language "
        "(chatterbot-corpus; a part eval's forgetting check never scores), to reduce forgetting; 0 = none.")


class Lora(_Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) for rslora).")
    dropout: float = Field(0.0, ge=0, lt=1, description=(
        "Dropout on the LoRA input. Off by default, as in PEFT and Unsloth: PEFT draws a mask over every adapted "
        "layer's input at each step, which cost 16-19% of training speed here (bench/RESULTS.md)."))
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="all-linear, or module names such as [q_proj, v_proj]."
    )
    modules_to_save: list[str] = Field(default_factory=list, description="Modules trained in full and saved.")
    variant: Literal["lora", "dora", "rslora"] = Field("lora", description="LoRA, DoRA or rank-stabilised LoRA.")


class Training(_Section):
    method: Literal["sft", "dpo", "orpo"] = Field(
        "sft", description="sft = supervised on the replies; dpo / orpo = preference tuning on chosen vs rejected "
                           "replies (data in the preference format; train/preference.py).")
    beta: float = Field(0.1, gt=0, description="dpo: strength of the pull towards the reference (TRL's beta); "
                                               "orpo: weight of the odds-ratio term (the ORPO paper's lambda).")
    sft_weight: float = Field(0.0, ge=0, description="dpo: weight of a supervised term, the chosen reply's mean "
                              "per-token NLL, added to each pair's loss (RPO's alpha; TRL's loss_type sft). Keeps DPO "
                              "from buying its margin by lowering the chosen reply too (ORPO has this term built in).")
    epochs: float | None = Field(None, gt=0, description="Passes over the training data (default 1 when max_steps is unset).")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; wins over epochs.")
    batch_size: int = Field(4, gt=0, description="Samples (or packed rows) per device per micro-step.")
    grad_accum: int = Field(4, gt=0, description="Micro-steps per optimizer step.")
    lr: float = Field(2.0e-4, gt=0, description="Peak learning rate.")
    optimizer: Literal["adamw", "adamw_8bit", "sgd", "adafactor"] = Field("adamw", description="Optimizer.")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    packing: bool = Field(False, description="Pack samples into full rows; no attention crosses samples.")
    gradient_checkpointing: Literal["auto", "offload"] | bool = Field(
        "auto", description="Recompute activations in the backward pass: far less memory for ~30% more compute. "
                            "offload = also keep the checkpoints in pinned host memory (GPU only; on a CPU the "
                            "same as true). auto = the fastest of off, on and offload that fits (lorachat plan's "
                            "estimate, with headroom).")
    seed: int = Field(42, description="Seed for data order, dropout and init.")
    log_every: int = Field(10, gt=0, description="Steps between log lines (train_log.jsonl).")
    eval_every: int | None = Field(None, gt=0, description="Steps between eval-loss passes (default: at the end).")
    save_every: int | None = Field(None, gt=0, description="Steps between checkpoints (default: none until the end).")
    keep_checkpoints: int = Field(2, gt=0, description="How many recent checkpoints to keep.")
    report_to: Literal["none", "tensorboard"] = Field("none", description="Extra metric sink.")
    distributed: Literal["ddp", "fsdp"] = Field("ddp", description="Multi-process strategy under accelerate.")
    kernels: Literal["none", "liger"] = Field(
        "none", description="liger = Liger-Kernel's fused RMSNorm, RoPE, SwiGLU and linear cross-entropy (CUDA only)."
    )
    on_nan: Literal["adapter", "run"] = Field(
        "adapter", description="In a joint run (several recipes in one finetune): a NaN or inf loss of this adapter "
                               "stops only this adapter (the others train on and are written) or the whole run. "
                               "A run of one recipe always stops.")

    @model_validator(mode="after")
    def _epochs_default(self) -> Training:
        if self.epochs is None and self.max_steps is None:
            self.epochs = 1.0
        return self

    @field_validator("sft_weight")
    @classmethod
    def _sft_weight_for_dpo(cls, weight: float, info: ValidationInfo) -> float:
        method = info.data.get("method", "dpo")
        if weight and method != "dpo":
            raise ValueError(f"sft_weight is for method dpo, not {method}"
                             + (" (ORPO's loss has this term already)" if method == "orpo" else ""))
        return weight


class Output(_Section):
    dir: str | None = Field(None, description="Adapter directory (default adapters/<name>), relative to the working dir.")
    domain: str | None = Field(None, description="Domain tag for routing and the model card (e.g. construction).")
    language: str | None = Field(None, description="Language tag (ISO 639-1, e.g. sv).")


class Recipe(_Section):
    name: str = Field(description="Run and adapter name.")
    extends: str | None = Field(None, description="A parent recipe to inherit from, relative to this one.")
    base: Base
    template: Template = Field(default_factory=Template)
    data: Data
    lora: Lora = Field(default_factory=Lora)
    training: Training = Field(default_factory=Training)
    output: Output = Field(default_factory=Output)


@dataclass
class LoadedRecipe:
    """A validated recipe plus where each value came from, so later errors can point at a line."""

    recipe: Recipe
    path: Path
    lines: dict[tuple[str, ...], Where] = field(default_factory=dict)

    def dir_of(self, *key: str) -> Path:
        """Directory a relative path at `key` is resolved against: that of the file that set it.

        An inherited `data.train[0].path` is relative to the parent recipe; a `--set` value to the cwd.
        """
        found = self.lines.get(tuple(key))
        if found is None or found.file is None:
            return self.path.parent
        return Path.cwd() if found.file == "--set" else Path(found.file).parent

    def where(self, *key: str) -> Where:
        """The file and line of `key` (or of its nearest parent that has one)."""
        for end in range(len(key), 0, -1):
            if key[:end] in self.lines:
                found = self.lines[key[:end]]
                return Where(found.file, found.line, ".".join(key))
        return Where(self.path, None, ".".join(key))

    def to_yaml(self) -> str:
        """The fully resolved recipe (extends, --set and ${ENV} applied), as written into adapters.

        Local data and template paths become absolute: the copy lives in another folder and must still
        find the same files (eval re-derives the held-out split from it).
        """
        data = self.recipe.model_dump(mode="json", exclude={"extends"})
        for split in ("train", "eval"):
            sources = data["data"][split]
            for i, source in enumerate(sources if isinstance(sources, list) else []):
                source["path"] = self._absolute(source["path"], "data", split, str(i), "path")
        if data["template"]["file"]:
            data["template"]["file"] = self._absolute(data["template"]["file"], "template", "file")
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)

    def _absolute(self, path: str, *key: str) -> str:
        if path.startswith(("pkg:", "hf:")) or Path(path).expanduser().is_absolute():
            return path
        return str((self.dir_of(*key) / path).resolve())


def cuda_only_problems(loaded: LoadedRecipe, cuda: bool) -> list[LorachatError]:
    """Settings that run only on a CUDA GPU, refused up front on a machine without one (one line each)."""
    if cuda:
        return []
    recipe, problems = loaded.recipe, []
    if recipe.base.attn_implementation == "flash_attention_2":
        problems.append(LorachatError("flash_attention_2 runs only on CUDA GPUs; use auto (SDPA) on this machine",
                                      loaded.where("base", "attn_implementation")))
    if recipe.training.kernels == "liger":
        problems.append(LorachatError("liger kernels are Triton GPU kernels and need CUDA; use none on this machine",
                                      loaded.where("training", "kernels")))
    return problems


# ---------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] = ()) -> LoadedRecipe:
    """Read, inherit, override, expand and validate a recipe; raise RecipeError listing every problem."""
    path = Path(path)
    data, lines = _read_with_parents(path, seen=())
    for override in overrides:
        _apply_override(data, lines, override)
    problems: list[LorachatError] = []
    data = _expand_env(data, (), lines, problems)
    recipe = None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        # A union type reports one mistake once per branch: one problem per key, naming every branch.
        by_key: dict[tuple[str, ...], list[dict]] = {}
        for error in err.errors():
            by_key.setdefault(_key_of(error), []).append(error)
        problems += [_explain(key, errors, lines, path) for key, errors in by_key.items()]
    if problems:
        unique = {str(p): p for p in problems}
        raise RecipeError(sorted(unique.values(), key=lambda p: (str(p.where.file), p.where.line or 0)))
    return LoadedRecipe(recipe=recipe, path=path, lines=lines)


def _read_with_parents(path: Path, seen: tuple[Path, ...]) -> tuple[dict, dict]:
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise LorachatError(f"extends: cycle: {chain}", Where(path))
    data, lines = _read_yaml(path)
    parent = data.get("extends")
    if parent is None:
        return data, lines
    if not isinstance(parent, str):
        raise LorachatError("must be a path to another recipe", lines.get(("extends",), Where(path, None, "extends")))
    parent_path = path.parent / parent
    if not parent_path.is_file():
        where = lines[("extends",)]
        raise LorachatError(f"no such recipe: {parent_path}", where)
    parent_data, parent_lines = _read_with_parents(parent_path, (*seen, resolved))
    return _deep_merge(parent_data, data), {**parent_lines, **lines}


def _read_yaml(path: Path) -> tuple[dict, dict[tuple[str, ...], Where]]:
    """Parse YAML and record the line of every mapping key, keyed by its path."""
    if not path.is_file():
        raise LorachatError("recipe not found", Where(path))
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise LorachatError(f"invalid YAML: {getattr(err, 'problem', err)}", Where(path, line)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LorachatError("a recipe must be a mapping of sections (name, base, data, ...)", Where(path, 1))
    lines: dict[tuple[str, ...], Where] = {}
    _record_lines(node, (), path, lines)
    return data, lines


def _record_lines(node: yaml.Node, prefix: tuple[str, ...], path: Path, lines: dict) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = prefix + (str(key_node.value),)
            lines[key] = Where(path, key_node.start_mark.line + 1, ".".join(key))
            _record_lines(value_node, key, path, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            key = prefix + (str(i),)
            lines[key] = Where(path, item.start_mark.line + 1, ".".join(key))
            _record_lines(item, key, path, lines)


def _deep_merge(parent: dict, child: dict) -> dict:
    merged = dict(parent)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_override(data: dict, lines: dict, override: str) -> None:
    """`a.b=c`: the value is parsed as YAML, so `lr=1e-4`, `packing=true`, `target_modules=[q_proj]` work."""
    where = Where("--set", None, override)
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise LorachatError("expected KEY=VALUE, e.g. training.lr=1e-4", where)
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    target = data
    for part in parts[:-1]:
        if isinstance(target, list) and part.isdigit() and int(part) < len(target):
            target = target[int(part)]
            continue
        if not isinstance(target, dict):
            raise LorachatError(f"cannot set {key}: {part} is not a section", where)
        target = target.setdefault(part, {})
    last = parts[-1]
    if isinstance(target, list) and last.isdigit() and int(last) < len(target):
        target[int(last)] = value
    elif isinstance(target, dict):
        target[last] = value
    else:
        raise LorachatError(f"cannot set {key}: its parent is not a section", where)
    lines[tuple(parts)] = Where("--set", None, key)


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, key: tuple[str, ...], lines: dict, problems: list) -> Any:
    if isinstance(value, dict):
        return {k: _expand_env(v, key + (str(k),), lines, problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, key + (str(i),), lines, problems) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        where = lines.get(key) or Where(None, None, ".".join(key))
        problems.append(LorachatError(f"environment variable ${{{name}}} is not set (use ${{{name}:-default}})", where))
        return ""

    expanded = _ENV.sub(substitute, value)
    # A whole-value substitution like `lr: ${LR}` should still become a number or bool.
    if _ENV.fullmatch(value):
        try:
            return yaml.safe_load(expanded)
        except yaml.YAMLError:
            return expanded
    return expanded


# ---------------------------------------------------------------- error messages


_SECTIONS: dict[str, type[BaseModel]] = {
    "base": Base, "template": Template, "data": Data, "lora": Lora, "training": Training, "output": Output,
}
_NESTED: dict[tuple[str, ...], type[BaseModel]] = {("data", "train"): Source, ("data", "eval"): EvalSplit}


def _model_at(loc: tuple[str, ...]) -> type[BaseModel]:
    """The pydantic model that owns the last key of `loc` (list indices skipped)."""
    names = tuple(p for p in loc[:-1] if not p.isdigit())
    if not names:
        return Recipe
    if names in _NESTED:
        return _NESTED[names]
    return _SECTIONS.get(names[0], Recipe)


def _did_you_mean(loc: tuple[str, ...]) -> str:
    bad = loc[-1]
    owner = _model_at(loc)
    for section, model in _SECTIONS.items():
        if bad in model.model_fields and model is not owner:
            return f"unknown key '{bad}' here; it belongs under '{section}:'"
    close = difflib.get_close_matches(bad, list(owner.model_fields), n=1, cutoff=0.6)
    if close:
        return f"unknown key '{bad}'; did you mean '{close[0]}'?"
    known = ", ".join(owner.model_fields)
    return f"unknown key '{bad}' (known: {known})"


def _key_of(error: dict) -> tuple[str, ...]:
    """The recipe key of a pydantic error: union branches ('list[Source]', 'literal[...]', 'bool') dropped."""
    return tuple(str(p) for p in error["loc"]
                 if not re.match(r"^(list|literal|function|dict)\[|^[A-Z]|^(bool|int|float|str)$", str(p)))


def _explain(loc: tuple[str, ...], errors: list[dict], lines: dict, path: Path) -> LorachatError:
    """One problem for the key `loc`: its pydantic errors, one per union branch, read as alternatives."""
    where = None
    for end in range(len(loc), 0, -1):
        if loc[:end] in lines:
            found = lines[loc[:end]]
            where = Where(found.file, found.line, ".".join(loc))
            break
    where = where or Where(path, None, ".".join(loc) or None)
    kinds = {error["type"] for error in errors}
    if "extra_forbidden" in kinds:
        return LorachatError(_did_you_mean(loc), where)
    if "missing" in kinds:
        return LorachatError("required key is missing", where)
    value = errors[0].get("input")
    shown = f" (got {value!r})" if not isinstance(value, (dict, list)) else ""
    lead = "Input should be "
    messages = [errors[0]["msg"]] + [e["msg"].removeprefix(lead) if errors[0]["msg"].startswith(lead) else e["msg"]
                                     for e in errors[1:]]
    return LorachatError(f"{' or '.join(messages)}{shown}", where)
