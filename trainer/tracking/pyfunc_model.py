"""The pyfunc flavour of a logged turnout model: prompts in, generated text out.

:class:`TextGenerator` is what :mod:`turnout.trainer.tracking.model_log` logs and what
``mlflow.pyfunc.load_model`` / ``mlflow models serve`` rebuild (MLflow pickles the
instance, which names this class by its import path, so turnout must be importable
where the model is loaded: ``mlflow models serve --env-manager local`` in the
environment turnout is installed in).

- :meth:`TextGenerator.load_context` loads the weights once: the model's own copy of an
  export folder (the artifact :data:`ARTIFACT`), or, for a model logged by reference,
  the folder named in the model config's :data:`SOURCE_KEY` (an export folder, or a
  checkpoint step folder read by :func:`turnout.trainer.weights.from_checkpoint.
  load_for_inference`). ``model_config={"device": "cuda"}`` at load time picks the device
  (``cpu`` by default).
- :meth:`TextGenerator.predict` takes prompts (a DataFrame with a ``prompt`` column, a
  list of strings or one string) and the params of :data:`PARAMS` and returns, per
  prompt, the prompt followed by its continuation: exactly what ``turnout generate``
  prints, through the same code (:func:`turnout.trainer.eval.inference.sample_text`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd  # type: ignore[import-untyped]
from mlflow.pyfunc import PythonModel

from turnout.errors import ConfigError

#: The artifact (an export folder) of a model logged by copy.
ARTIFACT = "model"
#: model_config key: the folder a model logged by reference loads from.
SOURCE_KEY = "source"
#: model_config key: the torch device the model loads on.
DEVICE_KEY = "device"
#: Input column of the prompts; output column of the texts.
PROMPT, TEXT = "prompt", "text"
#: Per-request params and their defaults (those of ``turnout generate``).
PARAMS: dict[str, tuple[str, Any]] = {
    "max_new_tokens": ("long", 200),
    "temperature": ("double", 0.8),
    "seed": ("long", 0),
}


def signature() -> Any:
    """The model signature: one string column of prompts (unnamed, so a plain list of
    strings is an input too), a string column of texts, the params."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string", TEXT)]),
        params=ParamSchema([ParamSpec(k, dtype, value) for k, (dtype, value) in PARAMS.items()]),
    )


def load_folder(folder: Path, device: str) -> tuple[Any, Any]:
    """(model, tokenizer) of an export folder or a checkpoint folder, on ``device``."""
    from turnout.models.pretrained import export_config, from_pretrained, is_export
    from turnout.trainer.data import tokenizer_files

    if is_export(folder):
        return from_pretrained(folder, device), tokenizer_files.load(folder, export_config(folder))
    from turnout.trainer.weights.from_checkpoint import load_for_inference

    model, cfg, info = load_for_inference(folder, device)
    return model, tokenizer_files.load(info.folder, cfg)


def prompts_of(model_input: Any) -> list[str]:
    """The prompts of a predict input: a DataFrame (its ``prompt`` column, else its only
    column), a Series, a list of strings or one string."""
    if isinstance(model_input, pd.DataFrame):
        if PROMPT in model_input.columns:
            model_input = model_input[PROMPT]
        elif len(model_input.columns) == 1:
            model_input = model_input.iloc[:, 0]
        else:
            raise ConfigError("prompt", f"expected a '{PROMPT}' column, got {list(model_input)}")
    if isinstance(model_input, str):
        model_input = [model_input]
    prompts = list(model_input)
    if not all(isinstance(p, str) for p in prompts):
        raise ConfigError("prompt", "every prompt must be a string")
    return prompts


class TextGenerator(PythonModel):
    """Text generation with turnout's own KV-cached decoder (see the module docstring)."""

    def load_context(self, context: Any) -> None:
        config = dict(context.model_config or {})
        artifacts = dict(context.artifacts or {})
        folder = artifacts.get(ARTIFACT) or config.get(SOURCE_KEY)
        if not folder:
            raise ConfigError("model_config", f"names neither an artifact nor a {SOURCE_KEY!r}")
        path = Path(folder)
        if not path.is_dir():
            raise ConfigError(
                SOURCE_KEY,
                f"{path} does not exist: this model was logged by reference to that folder",
            )
        self._model, self._tokenizer = load_folder(path, str(config.get(DEVICE_KEY, "cpu")))

    # model_input carries no annotation on purpose: MLflow reads a type hint there as the
    # input schema and warns about any that is not list[...]; the signature says it.
    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> Any:
        from turnout.trainer.eval.inference import sample_text

        given = {k: default for k, (_, default) in PARAMS.items()}
        given.update({k: v for k, v in (params or {}).items() if v is not None})
        if int(given["max_new_tokens"]) < 0:
            raise ConfigError("max_new_tokens", f"must be >= 0, got {given['max_new_tokens']}")
        texts = [
            sample_text(
                self._model,
                prompt,
                int(given["max_new_tokens"]),
                float(given["temperature"]),
                int(given["seed"]),
                None,
                self._tokenizer,
            ).text
            for prompt in prompts_of(model_input)
        ]
        return pd.DataFrame({TEXT: texts})
