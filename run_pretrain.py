"""Self-supervised pretraining of SwinV2 (`method.name`: simmim, moby, esvit, sit) on WebDataset shards with DeepSpeed (ZeRO, bf16).

Demo (no --config: a small SwinV2 on generated demo shards, a few minutes on 2 CPU cores):
    deepspeed --num_gpus 2 run_pretrain.py
A published recipe on one 8-GPU node:
    deepspeed run_pretrain.py --ds_config ds_configs/zero3.json --config configs/pretrain/swinv2_base.yaml \
        data.path=/data/imagenet-shards
SLURM (one task per GPU; scale/dist.py maps SLURM_* to what DeepSpeed expects):
    srun python run_pretrain.py --config configs/pretrain/swinv2_giant.yaml data.path=/data/shards
Dotted overrides after the options, type-checked against configs (see scale/config.py), e.g.
    model.name=swinv2_base train.max_steps=100 checkpoint.every_steps=50 output_dir=/x resume=auto
Export weights for fine-tuning: python -m scale.export output/<name> pretrained.pt
"""
import argparse
import os

from scale.config import DEMO_CONFIG, ConfigError, check_data_path, check_method, check_model_name, load_config
from scale.dist import init_distributed, seed_everything
from scale.checkpoint import CheckpointManager, check_elastic, check_resumable
from scale.ds_config import fill_ds_config, load_ds_config, precision_of, with_universal_load
from scale.engine import NonFiniteLossError, build_engine, partitioned
from scale.launch import (announce_device, check_can_start, config_error, data_path_or_demo, exit_process,
                          main_rank_log, start_process, trainer_arg_parser, write_run_files)
from scale.loop import Trainer
from scale.lr_schedule import build_lr_schedule, scale_lr
from scale.metrics import MetricsProcessor, device_peak_flops
from scale.preemption import EXIT_PREEMPTED, Preempted, requeue_job
from scale.tasks import build_task


def parse_args(argv=None) -> argparse.Namespace:
    p = trainer_arg_parser("Self-supervised pretraining of SwinV2 with DeepSpeed (method.name: simmim | moby | esvit | sit)", DEMO_CONFIG)
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    world_size, is_rank0, cuda = start_process()

    # -------------------------------------------------------------------- config: fail fast, in one line
    try:
        cfg = load_config(args.config, args.overrides)
        check_model_name(cfg, cuda)
        check_method(cfg, world_size)
        check_data_path(cfg)
        check_can_start(cfg)
        global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world_size
        peak_lr = scale_lr(cfg.optim.lr, global_batch, cfg.optim.lr_batch_base)
        ds = fill_ds_config(load_ds_config(args.ds_config), cfg, world_size=world_size, cuda=cuda, peak_lr=peak_lr)
        resuming = CheckpointManager(cfg.checkpoint, cfg.output_dir, rank=0).resolve_resume(cfg.resume)
        if resuming is not None:
            check_resumable(*resuming, cfg)  # weights-only trainer files, the same model: refused before init
        if resuming is not None and check_elastic(*resuming, world_size):
            ds = with_universal_load(ds)  # another world size: must be known before deepspeed.initialize
    except ConfigError as e:
        return config_error(e, is_rank0)

    # -------------------------------------------------------------------- distributed setup
    import deepspeed.comm as dist

    import data

    info = init_distributed()
    log = main_rank_log(info)
    if args.config is None:
        log("no --config given: running the demo (configs/pretrain/demo.yaml: a small SwinV2 on generated "
            "demo shards); pass --config configs/pretrain/<size>.yaml for a real run")
    announce_device(ds, cuda, log)
    log(f"{info.world_size} rank(s) on {info.device.type}, ZeRO stage {ds['zero_optimization']['stage']}, "
        f"{precision_of(ds)}, global batch {global_batch}, method {cfg.method.name}, output {cfg.output_dir}")
    write_run_files(cfg, ds, info)
    seed_everything(cfg.seed)  # same seed everywhere: identical init on every rank
    task = build_task(cfg.method.name, cfg, info, log)

    # -------------------------------------------------------------------- data
    loader = data.ShardLoader(data_path_or_demo(cfg.data.path, info), task.train_transform(),
                              cfg.train.micro_batch_size, rank=info.rank, world_size=info.world_size,
                              num_workers=cfg.data.num_workers, seed=cfg.seed, resampled=cfg.data.resampled)
    steps_per_epoch = max(1, len(loader) // cfg.train.grad_accum_steps)
    total_steps = cfg.train.max_steps or round(cfg.train.epochs * steps_per_epoch)
    task.total_steps = total_steps  # before its param groups: a group may be frozen for some steps
    schedule = build_lr_schedule(cfg.schedule, lr=cfg.optim.lr, global_batch=global_batch,
                                 batch_base=cfg.optim.lr_batch_base, total_steps=total_steps, epochs=cfg.train.epochs,
                                 weight_decay=cfg.optim.weight_decay)

    # -------------------------------------------------------------------- model, optimizer, engine
    with partitioned(ds):  # ZeRO-3: every rank holds only its shard from the start
        model = task.build_model()
    engine = build_engine(model, task.param_groups(model), ds, info)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    flops_per_image = task.flops_per_image(model)
    log(f"model {cfg.model.name}: {n_params / 1e6:.2f}M parameters, {flops_per_image / 1e9:.2f} GFLOPs/image fwd, "
        f"{len(loader)} batches/epoch/rank, {total_steps} steps")

    # -------------------------------------------------------------------- resume
    trainer = Trainer(cfg, task, engine, info, log)
    try:
        resumed = trainer.resume(cfg.resume)
    except ConfigError as e:  # damage found only by DeepSpeed's loader, after init
        return config_error(e, info.is_main)
    if resumed is not None:
        trainer.restore_loader(loader, resumed)
        trainer.check_schedule(schedule)
        if trainer.step >= total_steps:
            log(f"already at step {trainer.step} of {total_steps}: nothing to train (resume=none starts over, "
                f"train.max_steps=N goes further)")

    # -------------------------------------------------------------------- train
    metrics = MetricsProcessor(trainer.logger, every_steps=cfg.log.every_steps, total_steps=total_steps,
                               images_per_step=global_batch, flops_per_image=flops_per_image,
                               peak_flops=device_peak_flops(info.device), device=info.device,
                               world_size=info.world_size, print_fn=log)
    exit_code, requeue = 0, False
    try:
        trainer.train(loader, schedule, metrics, until=total_steps)
        trainer.save_if_new()
    except NonFiniteLossError as e:
        log(f"stopped: {e}")
        exit_code = 1
    except Preempted as e:
        log(str(e))
        exit_code, requeue = EXIT_PREEMPTED, e.requeue
    trainer.close()
    if exit_code == 0:
        log(f"done: {trainer.step} steps; checkpoints in {trainer.ckpt.dir}; export with: python -m scale.export "
            f"{cfg.output_dir} {os.path.join(cfg.output_dir, 'pretrained.pt')}")
    if exit_code == EXIT_PREEMPTED and requeue and info.is_main:
        requeue_job(log)  # before the barrier: no rank exits (and srun ends the step) before the requeue is in
    dist.barrier()
    dist.destroy_process_group()
    return exit_code


if __name__ == "__main__":
    exit_process(main())
