"""Progressive-resolution fine-tuning of SwinV2 for classification, with DeepSpeed (ZeRO 1/2/3, bf16 on GPU).

Demo (no --config: three stages 64/w4 -> 96/w6 -> 128/w8 on the demo shards, a few minutes on 2 CPU cores):
    deepspeed --num_gpus 2 run_finetune.py --pretrained output/demo
A published recipe, from Microsoft's SwinV2-B ImageNet-22K weights:
    deepspeed run_finetune.py --ds_config ds_configs/zero3.json --config configs/finetune/swinv2_base_192to384.yaml \
        --pretrained swinv2_base_patch4_window12_192_22k.pth data.path=/data/imagenet-shards
--pretrained takes a run_pretrain.py output folder or checkpoint, a `scale.export` file, or Microsoft's or timm's
SwinV2 weights. Stages run one after another in this process: at each boundary the model moves to the new
resolution and window (the log-CPB MLP keeps the coordinates on the scale it was pretrained at), the data
pipeline is rebuilt, gradient accumulation keeps the global batch, the LR schedule goes on, the stage is
evaluated on the validation split and checkpointed. Results: <output_dir>/metrics.json.
Dotted overrides after the options, as for run_pretrain.py (output_dir=, resume=auto|none|PATH, train.max_steps=, ...).
"""
import argparse
import json
import os
import resource

from scale.checkpoint import CheckpointManager, check_elastic, check_resumable, tag_for
from scale.config import FINETUNE_DEMO_CONFIG, ConfigError, check_data_path, check_model_name, load_finetune_config
from scale.dist import init_distributed, local_world_size, seed_everything
from scale.ds_config import (fill_ds_config, load_ds_config, planned_precision, precision_of, with_universal_load,
                             zero_stage)
from scale.engine import NonFiniteLossError, build_engine, partitioned
from scale.launch import (announce_device, check_can_start, config_error, data_path_or_demo, exit_process,
                          main_rank_log, start_process, trainer_arg_parser, write_run_files)
from scale.loop import Trainer
from scale.lr_schedule import build_lr_schedule, scale_lr
from scale.memory import device_memory_budget
from scale.metrics import MetricsProcessor, device_peak_flops
from scale.preemption import EXIT_PREEMPTED, Preempted, requeue_job
from scale.pretrained import load_weights, open_pretrained
from scale.stages import plan_stages
from scale.tasks import build_task
from scale.tasks.classification import mixes


def parse_args(argv=None) -> argparse.Namespace:
    p = trainer_arg_parser("Progressive-resolution fine-tuning of SwinV2 with DeepSpeed", FINETUNE_DEMO_CONFIG)
    p.add_argument("--pretrained", default=None,
                   help="run folder or checkpoint of run_pretrain.py, scale.export file, Microsoft or timm SwinV2 "
                        "weights; omitted = the YAML's `pretrained`, else random init")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    world_size, is_rank0, cuda = start_process()

    # -------------------------------------------------------------------- config: fail fast, in one line
    try:
        cfg = load_finetune_config(args.config, args.overrides + ([f"pretrained={args.pretrained}"]
                                                                  if args.pretrained else []))
        check_model_name(cfg, cuda)
        check_data_path(cfg)
        check_can_start(cfg)
        source = open_pretrained(cfg.pretrained) if cfg.pretrained else None
        # the log-CPB MLP keeps seeing coordinates on the scale it learned: normalise by its pretraining windows
        if cfg.model.pretrained_window_sizes is None:
            cfg.model.pretrained_window_sizes = (source.windows if source and source.windows else
                                                 first_stage_windows(cfg))
        ds = load_ds_config(args.ds_config)
    except ConfigError as e:
        return config_error(e, is_rank0)

    # -------------------------------------------------------------------- distributed setup
    import deepspeed.comm as dist

    import data

    info = init_distributed()
    log = main_rank_log(info)
    if args.config is None:
        log("no --config given: running the demo (configs/finetune/demo_progressive.yaml: 64 -> 96 -> 128 px on "
            "the demo shards); pass --config configs/finetune/<recipe>.yaml for a real run")
    if source is None:
        log("WARNING: no --pretrained weights: fine-tuning starts from RANDOM INIT. Pass --pretrained with a "
            "run_pretrain.py output folder, a scale.export file, or Microsoft/timm SwinV2 weights")
    data_path = data_path_or_demo(cfg.data.path, info)
    val_path = cfg.finetune.val_path or data_path
    try:  # every rank reads the same index, so every rank fails alike
        known = data.check_num_classes(data_path, cfg.finetune.num_classes or None)
        cfg.finetune.num_classes = cfg.finetune.num_classes or known or 0
        if not cfg.finetune.num_classes:
            raise ConfigError(f"{data_path} has no index.json to count classes: set finetune.num_classes")
        train_rows = data.ShardLoader(data_path, None, 1, rank=info.rank, world_size=info.world_size,
                                      num_workers=0).per_rank
        runtime_bytes = 0 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        plans = plan_stages(cfg, world_size=info.world_size, samples_per_rank=train_rows,
                            budget_bytes=device_memory_budget(info.device, local_ranks=local_world_size()),
                            zero_stage=zero_stage(ds), offload=offload_of(ds),
                            precision=planned_precision(ds, cfg.train.precision, cuda),
                            runtime_bytes=runtime_bytes, even_micro_batch=mixes(cfg.finetune),
                            device_type=info.device.type)
        global_batch = cfg.train.global_batch_size
        peak_lr = scale_lr(cfg.optim.lr, global_batch, cfg.optim.lr_batch_base)
        ds = fill_ds_config(ds, cfg, world_size=world_size, cuda=cuda, peak_lr=peak_lr,
                            micro_batch=plans[0].micro_batch, grad_accum_steps=plans[0].grad_accum_steps)
        resuming = CheckpointManager(cfg.checkpoint, cfg.output_dir, rank=info.rank).resolve_resume(cfg.resume)
        if resuming is not None:
            check_resumable(*resuming, cfg)  # weights-only trainer files, the same model: refused before init
        if resuming is not None and check_elastic(*resuming, world_size):
            ds = with_universal_load(ds)  # another world size: must be known before deepspeed.initialize
    except (ConfigError, ValueError) as e:
        dist.destroy_process_group()
        return config_error(e, info.is_main)
    announce_device(ds, cuda, log)
    total_steps = plans[-1].end_step
    log(f"{info.world_size} rank(s) on {info.device.type}, ZeRO stage {zero_stage(ds)}, {precision_of(ds)}, "
        f"global batch {global_batch}, {cfg.finetune.num_classes} classes, {len(plans)} stage(s), "
        f"{total_steps} steps, log-CPB normalised by windows {cfg.model.pretrained_window_sizes}, "
        f"output {cfg.output_dir}")
    write_run_files(cfg, ds, info)
    seed_everything(cfg.seed)  # same seed everywhere: identical init on every rank
    task = build_task("classification", cfg, info, log)

    # -------------------------------------------------------------------- model (+ pretrained weights), engine
    with partitioned(ds):  # ZeRO-3: every rank holds only its shard from the start
        model = task.build_model()
    if source is not None and resuming is None:  # before deepspeed.initialize, which copies the fp32 master weights
        report = load_weights(model.encoder, source, zero3=zero_stage(ds) == 3, is_main=info.is_main)
        log(f"loaded {source.kind} weights {source.path}: {report}")
    engine = build_engine(model, task.param_groups(model), ds, info)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    log(f"model {cfg.model.name}: {n_params / 1e6:.2f}M parameters, {len(engine.param_groups)} parameter groups")
    schedule = build_lr_schedule(cfg.schedule, lr=cfg.optim.lr, global_batch=global_batch,
                                 batch_base=cfg.optim.lr_batch_base, total_steps=total_steps,
                                 epochs=sum(p.epochs for p in plans), weight_decay=cfg.optim.weight_decay)

    # -------------------------------------------------------------------- resume
    trainer = Trainer(cfg, task, engine, info, log)
    try:
        resumed = trainer.resume(cfg.resume)
    except ConfigError as e:  # damage found only by DeepSpeed's loader, after init
        return config_error(e, info.is_main)
    if resumed is not None:
        trainer.check_schedule(schedule)
    results = trainer.run_state.setdefault("stages", [])  # one record per evaluated stage
    best = trainer.run_state.setdefault("best", None)
    if best:
        trainer.ckpt.pinned.add(best["checkpoint"])

    # -------------------------------------------------------------------- stages
    exit_code, requeue = 0, False
    try:
        for plan in plans[len(results):]:
            stage = cfg.stages[plan.index]
            task.set_stage(stage, engine.module)
            engine.set_batch(plan.micro_batch, plan.grad_accum_steps)
            schedule.lr_factor = plan.lr_factor
            loader = data.ShardLoader(data_path, task.train_transform(), plan.micro_batch, rank=info.rank,
                                      world_size=info.world_size, num_workers=cfg.data.num_workers,
                                      seed=cfg.seed + 1000 * plan.index, resampled=cfg.data.resampled,
                                      num_classes=cfg.finetune.num_classes)
            if resumed is not None and plan.start_step < trainer.step <= plan.end_step:
                trainer.restore_loader(loader, resumed)  # the checkpoint was taken inside this stage
            log(plan.describe(info.world_size, len(plans)))
            metrics = MetricsProcessor(trainer.logger, every_steps=cfg.log.every_steps, total_steps=total_steps,
                                       images_per_step=global_batch, flops_per_image=task.flops_per_image(model),
                                       peak_flops=device_peak_flops(info.device), device=info.device,
                                       world_size=info.world_size, print_fn=log)
            trainer.train(loader, schedule, metrics, until=plan.end_step)

            val = data.ShardLoader(val_path, task.eval_transform(), plan.micro_batch, rank=info.rank,
                                   world_size=info.world_size, num_workers=cfg.data.num_workers, split="val",
                                   drop_last=False, num_classes=cfg.finetune.num_classes)
            scores = task.evaluate(engine, val)
            trainer.logger.scalars(trainer.step, {f"eval/{k}": v for k, v in scores.items()})
            results.append({"img_size": plan.img_size, "window_size": plan.window_size, **scores,
                            "epochs": plan.epochs, "steps": plan.end_step - plan.start_step,
                            "micro_batch": plan.micro_batch, "grad_accum_steps": plan.grad_accum_steps,
                            "checkpoint": tag_for(trainer.step)})
            top1 = max(v for k, v in scores.items() if k.endswith("top1"))
            log(f"stage {plan.index + 1}/{len(plans)} at {plan.img_size}px: " +
                ", ".join(f"{k} {v:.2f}%" for k, v in scores.items()))
            if best is None or top1 > best["top1"]:
                best = trainer.run_state["best"] = {"top1": top1, "stage": plan.index,
                                                    "checkpoint": results[-1]["checkpoint"]}
                trainer.ckpt.pinned = {best["checkpoint"]}
            trainer.save()  # the stage's end, with its results: a resume never repeats a finished stage
            if info.is_main:
                write_metrics(cfg, results, best, plans)
    except NonFiniteLossError as e:
        log(f"stopped: {e}")
        exit_code = 1
    except Preempted as e:
        log(str(e))
        exit_code, requeue = EXIT_PREEMPTED, e.requeue
    trainer.close()
    if exit_code == 0:
        log(f"done: {trainer.step} steps; best top-1 {best['top1']:.2f}% (stage {best['stage'] + 1}, "
            f"{trainer.ckpt.dir / best['checkpoint']}); metrics in {cfg.output_dir}/metrics.json; export with: "
            f"python -m scale.export {trainer.ckpt.dir / best['checkpoint']} out.pt [--format timm]")
    if exit_code == EXIT_PREEMPTED and requeue and info.is_main:
        requeue_job(log)  # before the barrier: no rank exits (and srun ends the step) before the requeue is in
    dist.barrier()
    dist.destroy_process_group()
    return exit_code


def first_stage_windows(cfg) -> list[int]:
    """Random init or unknown source: the MLP learns at stage 1's windows, so normalise every stage by those."""
    from scale.pretrained import stage_windows

    return stage_windows({"name": cfg.model.name, **cfg.model.build_args()})


def offload_of(ds: dict) -> str:
    """Where ZeRO offloads the optimizer states: none, cpu or nvme."""
    return ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") or "none"


def write_metrics(cfg, results: list[dict], best: dict, plans: list) -> None:
    """<output_dir>/metrics.json, rewritten after every stage (atomically: a crash leaves the previous one)."""
    record = {"num_classes": cfg.finetune.num_classes, "stages": results, "best": best,
              "plan": [p.to_dict() for p in plans]}
    path = os.path.join(cfg.output_dir, "metrics.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    exit_process(main())
