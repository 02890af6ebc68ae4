"""The training loop shared by `drope pretrain` (phase rope) and `drope recalibrate` (phase drope):
the megatron-core model inside a DeepSpeed engine, on packed data, with resumable checkpoints."""

from __future__ import annotations

import dataclasses

import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from deepspeed.runtime.utils import clip_grad_norm_
from tqdm import tqdm

from drope_megatron import checkpoint, distributed
from drope_megatron.config import ConfigError, ModelConfig, Recipe
from drope_megatron.data.documents import check_ends, check_paths, documents, file_names, format_note, resolved
from drope_megatron.data.packing import BatchStream, block_stream
from drope_megatron.data.tokenizer import load_tokenizer
from drope_megatron.model import build_model
from drope_megatron.train import checkpointing, engine as ds_engine
from drope_megatron.train.metrics import MetricsLog, require_tensorboard
from drope_megatron.train.zero3 import load_partitioned, sharded_for_save


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""

    exit_code = 3


def _model(recipe: Recipe, phase: str, ds_config: dict):
    """The model to train: from a Megatron checkpoint (`train.init_from`) or freshly initialised.
    Under ZeRO-3 the checkpoint is loaded straight into partitioned parameters."""
    init = recipe.train.init_from
    # The model is built in the dtype it trains in (as the DeepSpeed config finally says; DeepSpeed
    # would cast it anyway), so that what depends on it, e.g. the fused cross-entropy, sees it.
    # Without bf16 DeepSpeed keeps no fp32 master weights: a bf16 checkpoint trains in fp32.
    dtype = "bfloat16" if ds_config["bf16"]["enabled"] else "float32"
    # From a checkpoint: its architecture; the recipe adds the context, phase, QK-norm and attention
    # options (`init_from.resolve` checked the rest against the checkpoint when the recipe was loaded).
    attention = checkpoint.runtime_options(recipe.model)
    if init and ds_config["zero_optimization"].get("stage") == 3:
        model, m = load_partitioned(init, recipe.parallel, ds_config, recipe.model.qk_norm, attention, dtype)
    elif init:
        model, m = checkpoint.load_model(init, recipe.parallel, dtype, add_qk_norm=recipe.model.qk_norm,
                                         attention=attention)
    else:
        m = dataclasses.replace(recipe.model, params_dtype=dtype)
        model = build_model(m, recipe.parallel)
    m.phase = phase  # what this run trains (the checkpoint may have been saved in another phase)
    m.rope_layers = (recipe.model.rope_layers or m.rope_layers) if phase == "layers" else None
    model.set_phase(phase, m.rope_layers)
    m.params_dtype = dtype  # what the saved weights will be
    return model, m


def _tokenizer(recipe: Recipe, m: ModelConfig):
    path = recipe.data.tokenizer
    if path is None and recipe.train.init_from and (Path(recipe.train.init_from) / "tokenizer").is_dir():
        path = str(Path(recipe.train.init_from) / "tokenizer")
    if path is None:
        if recipe.data.format == "megatron":
            return None
        raise ConfigError("data.tokenizer is not set: point it at a tokenizer folder or sentencepiece .model")
    tok = load_tokenizer(path)
    if tok.vocab_size > m.vocab_size:
        raise ConfigError(f"tokenizer {path} has {tok.vocab_size} tokens but the model's vocabulary is "
                          f"{m.vocab_size}: use the model's own tokenizer")
    return tok


def train(recipe: Recipe, phase: str, show_progress: bool = True, notes: list[str] = ()) -> dict:
    """Run (or resume) the recipe's training; returns the last logged metrics. `notes`: lines for
    the user, printed once (rank 0)."""
    t, p = recipe.train, recipe.parallel
    if p.pipeline_model_parallel_size != 1:
        raise ConfigError("training runs TP x data parallel; set parallel.pipeline_model_parallel_size=1")
    if not recipe.data.paths:
        raise ConfigError("data.paths is empty: list the training files (or a Megatron dataset prefix)")
    recipe = dataclasses.replace(recipe, data=resolved(recipe.data))  # format: auto decided from the files
    check_paths(recipe.data)  # before the run folder or any process group exists
    needs_dir = [k for k, v in {"train.export_hf": t.export_hf, "train.tensorboard": t.tensorboard,
                                "train.save_interval": t.save_interval}.items() if v]
    if needs_dir and not t.save_dir:
        raise ConfigError(f"train.save_dir is not set, and {', '.join(needs_dir)} write there: set it")
    if t.export_hf and Path(t.export_hf).exists():  # found now, not after the run, and never replaced
        raise ConfigError(f"train.export_hf {t.export_hf} already exists: name a new folder or remove it")
    if t.tensorboard:  # every rank, before any collective: none may wait for a rank that stopped
        require_tensorboard()
    with distributed.session(p, t.seed) as env:
        dp = parallel_state.get_data_parallel_world_size()
        ds_config = ds_engine.deepspeed_config(t, dp)
        model, m = _model(recipe, phase, ds_config)
        if t.compile_layers:
            model.compile_layers()
        tok = _tokenizer(recipe, m)
        if tok is not None:  # before the run folder exists
            check_ends(recipe.data, tok.eos_id)
        engine = ds_engine.initialize(model, t, ds_config)
        run_dir = Path(t.save_dir) if t.save_dir else None
        layout = _layout(m, p, dp, engine, ds_config, t)
        client = checkpointing.load(engine, run_dir / "checkpoints", layout) if run_dir else None
        if client:
            ds_engine.rates_from_schedule(engine.lr_scheduler)
        step, position = (client["step"], client["data_position"]) if client else (0, 0)
        if step > t.steps:  # the loop would not run, and `final` would be the later checkpoint's
            raise ConfigError(f"{run_dir} has a checkpoint at step {step}, past train.steps={t.steps}: raise "
                              "train.steps or start a new run directory")
        if client and env.rank == 0:
            print(f"drope: resuming {run_dir} at step {step} (data position {position})", file=sys.stderr)
        if tok is None and t.save_dir:  # Megatron-format data trains without one
            notes = [*notes, "data.tokenizer is not set: the checkpoint will carry no tokenizer, which drope eval and "
                             "the Hugging Face export need; set data.tokenizer to the one the data was made with"]
        asked = recipe.model.params_dtype  # a run from a checkpoint: the checkpoint's (README)
        if not t.init_from and asked not in (ModelConfig.params_dtype, m.params_dtype):
            notes = [*notes, f"model.params_dtype={asked} does not apply: this run trains in {m.params_dtype}, "
                             "as train.precision (or the DeepSpeed config's bf16 block) decides"]
        notes = [*notes, *filter(None, [format_note(recipe.data)])]
        for note in notes if env.rank == 0 else ():
            print(f"drope: note: {note}", file=sys.stderr)
        if run_dir is None and env.rank == 0:  # legitimate for benchmarks; a mistake for a real run
            print("drope: note: train.save_dir is not set: this run keeps no checkpoint, metrics or final model",
                  file=sys.stderr)
        saved = client.get("data") if client else None  # checkpoints before data states: replayed
        d = recipe.data
        made_from = {"model.seq_length": m.seq_length, "train.seed": t.seed, "data.format": d.format,
                     "data.shuffle": d.shuffle, "data.paths (file names)": file_names(d), "data.text_key": d.text_key,
                     "data.streaming": d.streaming}  # streaming shuffles through a buffer: another order
        blocks = block_stream(lambda epoch, start: documents(recipe.data, tok, epoch, t.seed, start, m.vocab_size),
                              m.seq_length + 1, recipe.data.shuffle_window if recipe.data.shuffle else 0, t.seed,
                              saved, made_from)
        stream = BatchStream(blocks, t.micro_batch_size, parallel_state.get_data_parallel_rank(), dp, position,
                             replay=client is not None and saved is None)
        log = MetricsLog(run_dir, t.tensorboard, enabled=env.rank == 0, start=step)
        try:
            last = _steps(engine, stream, recipe, m, step, run_dir, layout, log, show_progress and env.rank == 0)
            if run_dir is not None:
                _save_final(engine, m, p, run_dir / "final", _source(recipe), Path(tok.source) if tok else None)
                if t.export_hf and env.rank == 0:
                    _export_hf(run_dir / "final", Path(t.export_hf))
        finally:
            log.close()
    return {**last, "rank": env.rank}


def _save_final(engine, m: ModelConfig, p, dst: Path, extra: dict, tokenizer: Path | None) -> None:
    """The trained model as a Megatron checkpoint; under ZeRO-3 each rank writes 1/dp of the parameters,
    gathered one at a time."""
    sharded = sharded_for_save(engine.module, m, p) if engine.zero_optimization_stage() == 3 else None
    checkpoint.save(engine.module, m, dst, extra=extra, tokenizer=tokenizer, sharded=sharded)


def _export_hf(final: Path, dst: Path) -> None:
    # A fresh process: the export builds a single-process world of its own, not part of this job.
    cmd = [sys.executable, "-m", "drope_megatron.cli", "convert", "megatron-to-hf", str(final), str(dst), "--quiet"]
    job_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    launchers = ("OMPI_", "PMI_", "PMIX_", "MPI_", "SLURM_", "TORCHELASTIC_")  # what discover() could read
    env = {k: v for k, v in os.environ.items() if k not in job_vars and not k.startswith(launchers)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise ConfigError(f"Hugging Face export to {dst} failed: {reason} "
                          f"(the Megatron checkpoint {final} is complete)")
    print(proc.stdout.strip())


def _source(recipe: Recipe) -> dict:
    init = recipe.train.init_from
    return {"source": checkpoint.read_meta(init)["source"]} if init and "source" in checkpoint.read_meta(init) else {}


def _layout(m: ModelConfig, p, dp: int, engine, ds_config: dict, t) -> dict[str, Any]:
    """What a checkpoint must have been written under to be resumed: the layout its optimizer
    state is sharded by, the precision and offload its optimizer wrapper has, and the optimizer's
    settings, which DeepSpeed restores from the checkpoint over the recipe's (Megatron-LM refuses
    such a change too), and the model's shape and attention math (another would fail to load, or
    silently train another model). The schedule is rebuilt from the recipe."""
    offload = (ds_config["zero_optimization"].get("offload_optimizer") or {}).get("device", "none")
    return {"phase": m.phase, "tp": p.tensor_model_parallel_size, "dp": dp,
            "zero_stage": engine.zero_optimization_stage(), "bf16": ds_config["bf16"]["enabled"] is True,
            "offload_optimizer": offload not in (None, "none", "auto"), "train.lr": t.lr,  # DeepSpeed: auto is none
            "train.weight_decay": t.weight_decay, "train.adam_beta1": t.adam_beta1,
            "train.adam_beta2": t.adam_beta2, "train.adam_eps": t.adam_eps, **model_layout(m)}


# Settings a resume may change: how the same math runs, or what only a fresh start reads. (Not
# make_vocab_size_divisible_by: without a fixed padded_vocab_size it sizes the embedding.)
RESUMABLE_MODEL_KEYS = {"phase", "fused_kernels", "attention_backend", "params_dtype", "init_method_std"}


def model_layout(m: ModelConfig) -> dict[str, Any]:
    """The model settings a checkpoint must have been written under, as `model.KEY`."""
    return {f"model.{k}": v for k, v in dataclasses.asdict(m).items() if k not in RESUMABLE_MODEL_KEYS}


def _steps(engine, stream, recipe, m, step, run_dir, layout, log, show_progress) -> dict:
    t = recipe.train
    gas = engine.gradient_accumulation_steps()
    device = engine.device
    positions = torch.arange(m.seq_length, device=device).expand(t.micro_batch_size, m.seq_length)
    tokens_per_step = t.global_batch_size * m.seq_length
    bar = tqdm(total=t.steps, initial=step, disable=not show_progress, unit="step", desc=f"train ({m.phase})")
    ckpt_dir = run_dir / "checkpoints" if run_dir else None
    last: dict = {}
    while step < t.steps:
        start = time.perf_counter()
        total = torch.zeros((), device=device)
        grad_norm = None
        lr = engine.get_lr()[0]  # engine.step() moves the schedule on: this is the rate the step uses
        saving = ckpt_dir is not None and _saved(step + 1, t)
        logged = _logged(step + 1, t) or saving  # a checkpoint is written only after a finite gradient norm
        for _ in range(gas):
            batch = stream.next_micro_batch().to(device, non_blocking=True)
            loss = engine(batch[:, :-1], positions, None, labels=batch[:, 1:]).float().mean()
            engine.backward(loss)
            if logged and engine.is_gradient_accumulation_boundary() and engine.zero_optimization_stage() == 0 \
                    and not engine.bfloat16_enabled():
                # ZeRO-0 in fp32 clips without reporting the norm (its bf16 wrapper reports it);
                # measure it the way DeepSpeed clips (TP-aware).
                grad_norm = clip_grad_norm_(list(engine.module.parameters()), max_norm=float("inf"),
                                            mpu=ds_engine.MegatronMPU())
            engine.step()
            total += loss.detach()
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
        loss_value = total.item() / (gas * parallel_state.get_data_parallel_world_size())
        step += 1
        norm = _grad_norm(engine, grad_norm)
        # A step with an infinite gradient norm may already have written NaN weights (fp32 clipping
        # multiplies by 0): it is not saved as a good checkpoint; the next loss shows the damage.
        bad_norm = saving and norm is not None and not math.isfinite(norm)
        if not math.isfinite(loss_value) or bad_norm:
            what = f"gradient norm is {norm}" if bad_norm else f"loss is {loss_value}"
            good = checkpointing.latest_tag(ckpt_dir) if ckpt_dir else None
            raise TrainingDiverged(f"{what} at step {step}; last good checkpoint: "
                                   f"{ckpt_dir / good if good else 'none'} (lower train.lr or check the data)")
        elapsed = time.perf_counter() - start
        last = {"loss": loss_value, "lr": lr, "grad_norm": norm, "skipped_steps": engine.skipped_steps,
                "tokens_per_s": tokens_per_step / elapsed, "rss_gib": psutil.Process().memory_info().rss / 2**30,
                **({"gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30} if torch.cuda.is_available() else {}),
                "data_position": stream.position}
        if step == 1:
            last.update(_partition_sizes(engine))
        if _logged(step, t):
            log.log(step, last)
        bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
        bar.update()
        if saving:
            checkpointing.save(engine, ckpt_dir, step, stream.position, layout, t.keep_last, stream.state())
    bar.close()
    return {"step": step, **last}


def _logged(step: int, t) -> bool:
    return step % t.log_interval == 0 or step == t.steps or step == 1


def _saved(step: int, t) -> bool:
    return step == t.steps or bool(t.save_interval and step % t.save_interval == 0)


def _partition_sizes(engine) -> dict[str, int]:
    """Elements this rank holds of the parameters and of the optimizer state (ZeRO splits both)."""
    params = list(engine.module.parameters())
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    state = sum(t.numel() for s in inner.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    return {"params_local": local, "params_total": total, "optimizer_state_local": state}


def _grad_norm(engine, measured) -> float | None:
    norm = engine.get_global_grad_norm()
    norm = measured if norm is None else norm
    return float(norm) if norm is not None else None
