"""Models and tokenizers: the backend, the one chat renderer, the tiny random Qwen3 for offline runs, and the
loader 03 generates with. Unsloth must be imported before transformers, TRL and PEFT: call `backend()` first."""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any, Literal

import torch  # torch may come before Unsloth; transformers, TRL and PEFT may not

from helpers.config import TINY_MODEL, Config
from helpers.download import atomic_directory
from helpers.store import SettingsChanged, recorded_settings

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what PEFT saves and loads
TINY_WIDE_MODEL = "tiny-random-qwen3-wide"  # a second tiny size, twice as wide, for a tiny sweep over model sizes
TINY_MODELS = (TINY_MODEL, TINY_WIDE_MODEL)  # the names of the tiny random Qwen3s built in the run directory


@cache
def backend() -> Literal["unsloth", "transformers"]:
    """"unsloth" where a CUDA GPU and Unsloth are present (importing it first), else "transformers"."""
    if torch.cuda.is_available() and importlib.util.find_spec("unsloth") is not None:
        import unsloth  # noqa: F401  (must precede transformers, TRL and PEFT)

        return "unsloth"
    return "transformers"


def compute_dtype() -> Any:
    """bfloat16 where the GPU computes in it (compute capability 8 and up), float16 on older GPUs (a T4, which only
    emulates bfloat16: Unsloth trains in float16 there), float32 on the CPU."""
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def quantization_config(cfg: Config) -> Any:
    """from_pretrained's quantization_config: with cfg.load_in_4bit NF4 with double quantisation in the compute dtype,
    as Unsloth quantises on loading (the model named exactly, not its pre-quantised copy), so that 02 trains the adapter
    on the weights that load_for_generation loads, on either backend; None (16-bit weights) without it."""
    if not cfg.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype())


def use_gradient_checkpointing(cfg: Config) -> bool:
    """The config's choice, or on only where the GPU has under 20 GiB (a 15 GB T4)."""
    if cfg.gradient_checkpointing is not None:
        return cfg.gradient_checkpointing
    return torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory < 20 * 2**30


def render_chat(tokenizer: Any, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The one chat renderer of the series (training, generation, the judge): Qwen3's template in
    non-thinking mode, so the prompt ends with an empty think block and the model answers directly."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt,
                                         enable_thinking=False)


def build_tiny_tokenizer() -> Any:
    """A byte-level tokenizer with Qwen3's special tokens and chat template: every byte one token (so digits
    split one by one, as in Qwen's tokenizer), no merges."""
    backend()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: index for index, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        clean_up_tokenization_spaces=False)
    # As in Qwen3 (tokenizer_config.json of Qwen/Qwen3-1.7B): the chat markers are special tokens (the end of
    # text doubles as padding, <|im_end|> ends a turn), the think and tool tags ordinary added tokens.
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.add_tokens(["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"])
    # The real Qwen3 chat template, from the exact copy TRL ships (found without importing TRL).
    template = Path(importlib.util.find_spec("trl").origin).parent / "chat_templates" / "qwen3.jinja"
    tokenizer.chat_template = template.read_text(encoding="utf-8")
    return tokenizer


# Qwen3 shapes by model name: the two tiny ones the tiny profile builds (head_dim 64, as vLLM's CPU attention needs;
# the wide one has twice the width, so a tiny sweep has two sizes), and the dense Qwen3 models, each as its config.json
# on the Hugging Face hub (Qwen/Qwen3-0.6B ... Qwen/Qwen3-32B): hidden, MLP, layers, query and KV heads, tied embeddings.
QWEN3_SHAPES = {
    TINY_MODEL: dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=64, max_position_embeddings=2048, tie_word_embeddings=True),
    TINY_WIDE_MODEL: dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=64, max_position_embeddings=2048, tie_word_embeddings=True),
    **{f"Qwen/Qwen3-{size}": dict(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                                  num_attention_heads=heads, num_key_value_heads=8, head_dim=128,
                                  max_position_embeddings=40960, tie_word_embeddings=tied)
       for size, hidden, mlp, layers, heads, tied in (("0.6B", 1024, 3072, 28, 16, True),
                                                        ("1.7B", 2048, 6144, 28, 16, True),
                                                        ("4B", 2560, 9728, 36, 32, True),
                                                        ("8B", 4096, 12288, 36, 32, False),
                                                        ("14B", 5120, 17408, 40, 40, False),
                                                        ("32B", 5120, 25600, 64, 64, False))},
}
QWEN3_VOCAB = 151_936  # every Qwen3's vocabulary (the tiny tokenizer uses the first ids of a random model this big)


def shape_name(tiny: bool, shape: str | None) -> str:
    """`shape` (a key of QWEN3_SHAPES), or when None the tiny one, or with tiny=False Qwen3-1.7B's."""
    return shape or (TINY_MODEL if tiny else "Qwen/Qwen3-1.7B")


def qwen3_config(vocab_size: int, eos_token_id: int, pad_token_id: int, *, tiny: bool = True,
                 shape: str | None = None) -> Any:
    """The architecture of a Qwen3 of QWEN3_SHAPES (see shape_name)."""
    backend()
    from transformers import Qwen3Config

    shape = shape_name(tiny, shape)
    if shape not in QWEN3_SHAPES:
        raise ValueError(f"no Qwen3 shape named {shape!r}; known: {', '.join(QWEN3_SHAPES)}")
    return Qwen3Config(vocab_size=vocab_size, rope_theta=1_000_000.0, rms_norm_eps=1e-6, eos_token_id=eos_token_id,
                       pad_token_id=pad_token_id, bos_token_id=None, **QWEN3_SHAPES[shape])


def build_random_qwen3(out_dir: Path, *, tiny: bool = True, seed: int = 0, dtype: Any = None,
                       shape: str | None = None) -> Path:
    """Save a randomly initialised Qwen3 of a shape of QWEN3_SHAPES (see shape_name: by default the tiny one) with the
    tiny tokenizer, atomically (a temporary folder renamed), so an interrupted build leaves nothing half-made."""
    backend()
    from transformers import GenerationConfig, Qwen3ForCausalLM
    from transformers.utils import logging as hf_logging

    shape = shape_name(tiny, shape)
    small = shape in TINY_MODELS
    tokenizer = build_tiny_tokenizer()
    eos, pad = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    vocab_size = len(tokenizer) if small else QWEN3_VOCAB
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(qwen3_config(vocab_size, eos, pad, shape=shape)).to(dtype or torch.float32)
    if small:
        # Embeddings of std 0.2 instead of 0.02: tied embeddings that small keep a 64-wide model's logits
        # within about +-1 (RMSNorm fixes the hidden norm, LoRA leaves the embeddings frozen), so a LoRA
        # fine-tune could not take the loss far below ln(vocab) and tiny runs would not show learning.
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, 0.2)
    model.generation_config = GenerationConfig(eos_token_id=[eos, pad], pad_token_id=pad)
    with atomic_directory(Path(out_dir)) as staging:
        hf_logging.disable_progress_bar()  # no "Writing model shards" bar in the notebook that builds it
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        hf_logging.enable_progress_bar()
    return Path(out_dir)


def parameter_count(name: str) -> int:
    """The parameters of a Qwen3 named by a key of QWEN3_SHAPES, or saved in a folder (its config.json: a random-init
    model of build_random_qwen3), tied embeddings once: counted on a model built on PyTorch's meta device (no memory,
    no weights). ValueError for any other name."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if name in QWEN3_SHAPES:
        config = qwen3_config(len(build_tiny_tokenizer()) if name in TINY_MODELS else QWEN3_VOCAB, 0, 0, shape=name)
    elif (Path(name) / "config.json").is_file():
        config = AutoConfig.from_pretrained(name)
    else:
        raise ValueError(f"model {name!r}: neither a known Qwen3 shape ({', '.join(QWEN3_SHAPES)}) nor a folder with a "
                         "config.json (a random-init model of helpers.model.build_random_qwen3)")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(parameter.numel() for parameter in model.parameters())


def model_source(cfg: Config) -> str:
    """What to load: the hub name of the real model, or a tiny model's folder (built if missing, of the shape its name
    gives, each tiny model in its own folder)."""
    if cfg.model_name not in TINY_MODELS:
        return cfg.model_name
    folder = cfg.paths.tiny_model.with_name(cfg.paths.tiny_model.name + cfg.model_name.removeprefix(TINY_MODEL))  # -wide
    if not (folder / "config.json").is_file():
        build_random_qwen3(folder, seed=cfg.seed, shape=cfg.model_name)
    return str(folder)


def load_tokenizer(cfg: Config) -> Any:
    """The configured model's tokenizer (no weights loaded)."""
    backend()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_source(cfg))


def adapter_weights(adapter_dir: Path) -> dict:
    """{"weights_sha256": the sha256 of the adapter's weights file, None when missing}: part of the settings recorded
    beside an adapter when 02 saves it (helpers.training.save_adapter), so that the reuse rule covers its weights."""
    path = Path(adapter_dir) / ADAPTER_FILES[1]
    if not path.is_file():
        return {"weights_sha256": None}
    digest = hashlib.sha256()
    with open(path, "rb") as weights:
        while chunk := weights.read(2**24):
            digest.update(chunk)
    return {"weights_sha256": digest.hexdigest()}


def check_adapter(name: str, adapter_dir: Path) -> None:
    """FileNotFoundError naming a missing adapter file; SettingsChanged when the weights differ from the ones recorded
    when 02 saved them (another adapter's copied over, say). An adapter saved with no record is not compared."""
    adapter_dir = Path(adapter_dir)
    if missing := [file for file in ADAPTER_FILES if not (adapter_dir / file).is_file()]:
        raise FileNotFoundError(f"adapter {name!r}: {adapter_dir / missing[0]} is missing: train it with 02_finetune "
                                "(overwrite = True where the rest of the adapter is there)")
    recorded = recorded_settings(adapter_dir).get("weights_sha256")
    if recorded and recorded != (found := adapter_weights(adapter_dir)["weights_sha256"]):
        raise SettingsChanged(f"adapter {name!r}: the weights in {adapter_dir / ADAPTER_FILES[1]} (sha256 "
                              f"{found[:12]}...) are not the ones 02_finetune trained and recorded ({recorded[:12]}...): "
                              "train it again (02_finetune with overwrite = True)")


def load_for_generation(cfg: Config, adapters: Mapping[str, Path], *, unsloth: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode: the base model with each named LoRA adapter attached by PEFT, the first active
    (`model.set_adapter(name)` picks one; `with model.disable_adapter():` answers as the base). 03 loads with
    transformers (helpers.decoding drives its forward pass and KV cache); `unsloth=True` loads as Unsloth's own
    loading does, for 02's reload check in a process that Unsloth has patched. Each adapter is checked first
    (check_adapter)."""
    for name, path in adapters.items():
        check_adapter(name, path)
    from transformers import AutoTokenizer

    source = model_source(cfg)
    if unsloth:
        from unsloth import FastLanguageModel

        # Unsloth sizes its attention mask to max_seq_length: room for the longest prompt (a record is at most
        # cfg.max_seq_length, 01 checks) plus every new token. The exact model name, as 02 loads it.
        model, _ = FastLanguageModel.from_pretrained(model_name=source, max_seq_length=cfg.max_seq_length + cfg.max_new_tokens,
                                                     dtype=None, load_in_4bit=cfg.load_in_4bit, use_exact_model_name=True)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(source, dtype=compute_dtype(), quantization_config=quantization_config(cfg),
                                                     device_map="cuda" if torch.cuda.is_available() else None)
    if adapters:
        from peft import PeftModel

        (first, path), *rest = adapters.items()
        model = PeftModel.from_pretrained(model, str(path), adapter_name=first, is_trainable=unsloth)
        for name, path in rest:
            model.load_adapter(str(path), adapter_name=name, is_trainable=unsloth)
        model.set_adapter(first)
    if unsloth:
        model = FastLanguageModel.patch_peft_model(model, use_gradient_checkpointing=False) if adapters else model
        FastLanguageModel.for_inference(model)
    return model.eval(), AutoTokenizer.from_pretrained(source)
