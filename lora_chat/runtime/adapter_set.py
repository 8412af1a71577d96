"""One base loaded once, N adapters resident by name: what chat, serve and eval generate with.

    rt = AdapterSet.open(["adapters/faq-en", "adapters/faq-sv"])   # base, dtype, 4-bit from their recipes
    rt.names                      # ["base", "faq-en", "faq-sv"]
    rt.render("faq-sv", [{"role": "user", "content": "Hej!"}])      # that adapter's own chat template
    rt.load("adapters/faq-de")    # at runtime: checked against the base before its weights load
    rt.unload("faq-en")

What is loaded, and from where:
  - the base: `base=` if given, else the model id the first adapter's manifest records, resolved at the
    revision its recipe asked for (a different resolved revision than the manifest's is a note, not an
    error: the compatibility check below is what decides). dtype, quantization (QLoRA's 4-bit) and
    `trust_remote_code` come from the first adapter's recipe.yaml unless given; `trust_remote_code` is on
    only when the caller asks for it or every adapter's recipe does, never implicitly.
  - each adapter: checked with `adapters.compat.check_compatible` against the base's config.json
    (architecture, shapes, vocab) BEFORE any weights load, so a wrong adapter fails in a second with
    one line; then attached with PEFT under an internal key (PEFT keys cannot hold '.').
  - each resident (adapters and the base) keeps its chat template (the adapter's `chat_template.jinja`,
    the exact one it was trained with; the base uses its tokenizer's) and its stop ids.

Thread safety: `lock` (re-entrant) guards the model. `generate` holds it for a whole batch, `load` and
`unload` take it too, so an adapter never disappears under a running batch. Rows pick their adapter
by name in the batch itself (PEFT's `adapter_names=`), so no caller ever flips a global active
adapter that another caller's request would see; every LoRA layer computes such a batch in two matmuls
over its adapters' stacked matrices (`gathered_lora`), restacked at each load and unload. Concurrency
comes from batching (serve's scheduler), not from parallel forwards.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapters import TEMPLATE, AdapterInfo, check_compatible, read_adapter
from ..errors import LorachatError, ModelError, Where
from ..models import ResolvedBase, load_model, load_tokenizer, model_facts, resolve_base
from ..models.facts import stop_ids
from ..recipe import LoadedRecipe, load_recipe
from ..templates import ChatTemplate, load_template
from ..templates.tokens import AddedTokens, apply_added_tokens, restore_tokenizer

BASE = "base"  # the name of the base model among the residents
PEFT_BASE = "__base__"  # what PEFT calls "no adapter" in `adapter_names`


@dataclass(frozen=True)
class Resident:
    """A model the set can answer with: the base or one adapter on it."""

    name: str
    template: ChatTemplate
    stop_ids: tuple[int, ...]
    path: Path | None = None  # the adapter directory; None for the base
    info: AdapterInfo | None = None
    loaded: LoadedRecipe | None = None  # the adapter's recipe.yaml, when it has one
    domain: str | None = None
    language: str | None = None
    peft_name: str = PEFT_BASE  # the adapter's key inside PEFT


@dataclass(frozen=True)
class OpenedAdapter:
    """An adapter directory read (manifest, recipe), before its weights load."""

    info: AdapterInfo
    loaded: LoadedRecipe | None

    @property
    def name(self) -> str:
        return self.info.name

    def template(self, tokenizer: Any) -> ChatTemplate | None:
        """The exact template the adapter was trained with (its chat_template.jinja), else its recipe's."""
        saved = self.info.path / TEMPLATE
        system = self.loaded.recipe.template.system if self.loaded else None
        if saved.is_file():
            return ChatTemplate(saved.read_text(encoding="utf-8"), tokenizer, f"{self.name}/{TEMPLATE}", system)
        return load_template(self.loaded, tokenizer) if self.loaded else None


@dataclass
class SetPlan:
    """What `AdapterSet.open` will load, resolved and checked, before any weights: commands that have more
    to check (eval's data) do that between `make` and `load`, so bad input never waits for weights."""

    base: ResolvedBase  # config and tokenizer files only, so far
    model_ref: str  # what resolves it: a hub id or a folder
    revision: str
    adapters: list[OpenedAdapter]
    dtype: str
    quantization: str
    trust_remote_code: bool
    notes: list[str]
    warnings: list[str]  # what --force let through: shown as warnings, kept in eval's report notes

    @classmethod
    def make(cls, adapters: Sequence[str | Path] = (), *, base: str | None = None, dtype: str | None = None,
             quantization: str | None = None, trust_remote_code: bool | None = None, force: bool = False) -> SetPlan:
        """`force`: adapters trained on another id or revision of a base with the same shapes load, with a
        warning in `notes` (a shape or architecture difference is refused always)."""
        opened = [_open(Path(p)) for p in adapters]
        if base is None and not opened:
            raise LorachatError("no adapter and no base model given", Where(field="ADAPTER"))
        first = opened[0].loaded.recipe.base if opened and opened[0].loaded else None
        model_id = base or opened[0].info.base_model
        revision = first.revision if first and base is None else "main"
        resolved = resolve_base(model_id, revision, need_weights=False)
        facts = model_facts(resolved)
        _check_names([o.name for o in opened])
        warnings = []
        for o in opened:
            warnings += check_compatible(o.info, facts, base=resolved, force=force)
        notes = []
        recorded = opened[0].info.manifest.get("base", {}).get("revision") if opened and base is None else None
        if recorded and resolved.revision not in (recorded, "local"):
            notes.append(f"the adapters were trained on {model_id} at revision {recorded}; found {resolved.revision}")
        if trust_remote_code is None:
            trust_remote_code = bool(opened) and all(o.loaded and o.loaded.recipe.base.trust_remote_code
                                                     for o in opened)
        return cls(resolved, model_id, revision, opened, dtype or (first.dtype if first else "auto"),
                   quantization or (first.quantization if first else "none"), trust_remote_code, notes, warnings)

    def tokenizer(self) -> Any:
        """The base's tokenizer with the template tokens any adapter added to its vocabulary (templates/tokens.py)."""
        tokenizer = load_tokenizer(self.base, trust_remote_code=self.trust_remote_code)
        for o in self.adapters:
            restore_tokenizer(tokenizer, o.info.manifest)
        return tokenizer

    def load(self, tokenizer: Any = None, *, batch_invariant: bool = True,
             say: Callable[[str], None] = lambda line: None) -> AdapterSet:
        """Load the base's weights (once) and attach every adapter."""
        resolved = resolve_base(self.model_ref, self.revision, need_weights=True)
        notes = ([resolved.note] if resolved.note else []) + self.notes
        for note in notes:
            say(f"note: {note}")
        for warning in self.warnings:
            say(f"warning: {warning}")
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer()
        say(f"loading {resolved.model_id} ({self.dtype}, quantization {self.quantization})")
        model = load_model(resolved, dtype=self.dtype, quantization=self.quantization,
                           trust_remote_code=self.trust_remote_code, for_training=False)
        for o in self.adapters:  # before any adapter loads: its saved rows fill the embedding rows added here
            apply_added_tokens(model, tokenizer, o.info.manifest)
        if batch_invariant:
            from .invariant import use_invariant_kernels

            use_invariant_kernels(model)
        rt = AdapterSet(resolved, model, tokenizer, dtype=str(model.dtype).removeprefix("torch."),
                        quantization=self.quantization, batch_invariant=batch_invariant, notes=notes)
        for o in self.adapters:
            say(f"attaching adapter {o.name}")
            rt._attach(o)
        return rt


class AdapterSet:
    """The base once, adapters by name; build it with `AdapterSet.open`."""

    def __init__(self, base: ResolvedBase, model: Any, tokenizer: Any, *, dtype: str, quantization: str,
                 batch_invariant: bool, notes: Sequence[str] = ()):
        self.base = base
        self.model = model  # a PeftModel once an adapter is attached, else the plain causal LM
        self.tokenizer = tokenizer
        self.dtype = dtype  # as asked ("auto" resolved): "bfloat16", "float32", ...
        self.quantization = quantization
        self.batch_invariant = batch_invariant
        self.notes = list(notes)
        self.facts = model_facts(base)
        self.lock = threading.RLock()
        self._residents: dict[str, Resident] = {}
        self._counter = 0
        self._residents[BASE] = Resident(BASE, self._base_template(), self._stop_ids(None))

    # ------------------------------------------------------------ building

    @classmethod
    def open(cls, adapters: Sequence[str | Path] = (), *, base: str | None = None, dtype: str | None = None,
             quantization: str | None = None, trust_remote_code: bool | None = None, batch_invariant: bool = True,
             force: bool = False, say: Callable[[str], None] = lambda line: None) -> AdapterSet:
        """Load the base once and attach `adapters`; every adapter is checked before any weights load.

        `base` may also be a merged model folder with no adapters (eval compares one that way).
        `batch_invariant` (default) makes a row's greedy reply independent of the batch it runs in
        (see `invariant`); False runs the stock attention kernels, a little faster.
        """
        plan = SetPlan.make(adapters, base=base, dtype=dtype, quantization=quantization,
                            trust_remote_code=trust_remote_code, force=force)
        return plan.load(batch_invariant=batch_invariant, say=say)

    def load(self, path: str | Path, name: str | None = None) -> Resident:
        """Attach one more adapter while running; checked against the base before its weights load."""
        o = _open(Path(path), name)
        check_compatible(o.info, self.facts, base=self.base)
        if AddedTokens.from_manifest(o.info.manifest) is not None:
            raise LorachatError("this adapter adds template tokens to the base's vocabulary, which cannot change "
                                "under running requests: start the runtime with it instead", Where(o.info.path))
        with self.lock:
            _check_names([*(n for n in self._residents if n != BASE), o.info.name])
            return self._attach(o)

    def unload(self, name: str) -> None:
        """Detach an adapter (waits for a running batch to finish); the base cannot be unloaded."""
        if name == BASE:
            raise LorachatError("the base model cannot be unloaded", Where(field="name"))
        from . import gathered_lora

        with self.lock:
            resident = self.get(name)
            self.model.delete_adapter(resident.peft_name)
            gathered_lora.install(self.model)  # the adapter's matrices leave the stacks now, not at the next forward
            del self._residents[name]

    # ------------------------------------------------------------ using

    @property
    def names(self) -> list[str]:
        """The base first, then the adapters in the order they were attached."""
        return list(self._residents)

    @property
    def adapters(self) -> list[Resident]:
        return [r for name, r in self._residents.items() if name != BASE]

    def get(self, name: str) -> Resident:
        try:
            return self._residents[name]
        except KeyError:
            raise LorachatError(f"no model named {name!r}; loaded: {', '.join(self._residents)}",
                                Where(field="model")) from None

    @property
    def context_length(self) -> int | None:
        """The longest sequence (prompt + reply) the base was built for, from its config."""
        config = self.model.config
        return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    def render(self, name: str, messages: list[dict[str, str]]) -> str:
        """`messages` (role/content dicts, the history so far) as the prompt `name` replies to.

        Always with the generation prompt: the next turn is the model's, whether or not the
        history already holds an assistant turn. A template that refuses the conversation (roles
        out of order, ...) is a one-line LorachatError.
        """
        template = self.get(name).template
        if template.system and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": template.system}, *messages]
        try:
            return template.render(messages, add_generation_prompt=True)
        except Exception as err:  # jinja's TemplateError from raise_exception, or a template bug
            roles = "/".join(m.get("role", "?") for m in messages)
            raise LorachatError(f"chat template of {name!r} refused this conversation ({roles}): {err}",
                                Where(field="messages")) from None

    def peft_names(self, names: Sequence[str]) -> list[str]:
        """PEFT's per-row adapter keys for a batch whose rows name residents."""
        return [self.get(n).peft_name for n in names]

    # ------------------------------------------------------------ internals

    def _attach(self, o: OpenedAdapter) -> Resident:
        from peft import PeftModel

        from . import gathered_lora

        self._counter += 1
        key = f"a{self._counter}"
        kwargs = {"adapter_name": key}
        try:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(o.info.path), is_trainable=False, **kwargs)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(o.info.path), is_trainable=False, **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise ModelError(f"cannot load the adapter weights: {type(err).__name__}: {str(err).splitlines()[0]}",
                             Where(o.info.path)) from None
        self.model.eval()
        if self.batch_invariant:
            from .invariant import use_invariant_kernels

            use_invariant_kernels(self.model)  # the new LoRA matrices get the tiled forward too
        if self.model.peft_config[key].use_dora:
            self.model.delete_adapter(key)
            raise LorachatError("DoRA adapters cannot share a mixed-adapter batch (PEFT refuses adapter_names "
                                "with DoRA); merge it into the base with `lorachat merge` and load that",
                                Where(o.info.path, None, "lora.variant"))
        gathered_lora.install(self.model)
        recipe = o.loaded.recipe if o.loaded else None
        template = o.template(self.tokenizer) or self._base_template()
        resident = Resident(o.info.name, template, self._stop_ids(o.info.path), o.info.path, o.info, o.loaded,
                            recipe.output.domain if recipe else o.info.manifest.get("domain"),
                            recipe.output.language if recipe else o.info.manifest.get("language"), key)
        self._residents[o.info.name] = resident
        return resident

    def _base_template(self) -> ChatTemplate:
        source = getattr(self.tokenizer, "chat_template", None)
        if isinstance(source, dict):  # some tokenizers carry several named templates
            source = source.get("default")
        if not source:
            # A base without a template (a pretrained-only model) still renders something a reader can follow.
            source = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}assistant:{% endif %}")
        return ChatTemplate(source, self.tokenizer, f"{BASE} tokenizer")

    def _stop_ids(self, adapter_dir: Path | None) -> tuple[int, ...]:
        """The base's end-of-turn ids, plus the adapter's own: those of its generation config, and the eos its saved
        tokenizer names (its template may end turns with a token the base's tokenizer does not call eos)."""
        ids = set(stop_ids(self.tokenizer, self.base))
        if adapter_dir is not None:
            # An adapter that added template tokens saves a generation config naming its end-of-turn token.
            generation = adapter_dir / "generation_config.json"
            if generation.is_file():
                eos = json.loads(generation.read_text(encoding="utf-8")).get("eos_token_id")
                ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
            config = adapter_dir / "tokenizer_config.json"
            if config.is_file():
                eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
                eos = eos.get("content") if isinstance(eos, dict) else eos
                if isinstance(eos, str):
                    token = self.tokenizer.convert_tokens_to_ids(eos)
                    if token is not None and token != self.tokenizer.unk_token_id:
                        ids.add(token)
        return tuple(sorted(ids))


def _open(path: Path, name: str | None = None) -> OpenedAdapter:
    """Read an adapter directory (manifest and recipe) without touching its weights."""
    info = read_adapter(path)
    if name:
        info = AdapterInfo(info.path, name, info.manifest, info.recipe_yaml, info.base_model)
    recipe = Path(info.path) / "recipe.yaml"
    return OpenedAdapter(info, load_recipe(recipe) if recipe.is_file() else None)


def _check_names(names: list[str]) -> None:
    clash = sorted({n for n in names if names.count(n) > 1 or n == BASE})
    if clash:
        raise LorachatError(f"adapter names must be unique and not '{BASE}': {', '.join(clash)} "
                            f"(rename the directory, or give another name)", Where(field="ADAPTER"))
