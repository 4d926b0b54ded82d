"""The vision stage of LLaVA-NeXT on anyres images, unpruned against tome(positions='keep') (each crop merged in
place inside the encoder): does ToMe save encoder compute there? Random weights, a CLIP tower larger than the
test zoo's (224-pixel crops of 16 x 16 patches, 257 positions with CLS; 7 layers, features from layer -2; `--tower`
small: hidden 256, 8 heads, MLP 1024; vit-b: ViT-B/16's 768, 12, 3072) and a tiny LM (the vision stage alone is timed: the bucket's captured graph on one image's pixels).

    PYTHONPATH=. python benchmarks/tome_anyres_encoder.py [--sizes 448x448,448x300] [--tower small] [--repeats 15]

Prints, per image size: the median ms of the unpruned and the pruned vision stage (interleaved rounds, one
warm-up, graphprune.tools.timing.interleaved) and their ratio; and what the pass's info says of the crops
(encoder_rows: slots dropped from the encoder, or masked). Run it on two checkouts to compare them."""
from __future__ import annotations

import argparse
import warnings

import torch

METHODS = {"tome r=32 x5": "tome(r=32, layers=(0, 1, 2, 3, 4), positions='keep')",
           "tome keep=64": "tome(keep=64, layers=(0, 1, 2, 3, 4), positions='keep')"}


TOWERS = {"small": dict(hidden_size=256, intermediate_size=1024, num_attention_heads=8),
          "vit-b": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12)}


def build(tower: str = "small"):
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    from graphprune.tools.family_zoo import TEXT
    vc = CLIPVisionConfig(**TOWERS[tower], num_hidden_layers=7, image_size=224, patch_size=14)
    cfg = LlavaNextConfig(vision_config=vc, text_config=dict(model_type="llama", hidden_size=64, intermediate_size=128,
                                                             num_hidden_layers=2, **TEXT),
                          image_token_id=150, vision_feature_layer=-2, vision_feature_select_strategy="default",
                          image_grid_pinpoints=[[224, 448], [448, 224], [448, 448]])
    torch.manual_seed(0)
    return LlavaNextForConditionalGeneration(cfg).eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="448x448,448x300", help="image sizes HxW, comma separated")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tower", choices=sorted(TOWERS), default="small")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import graphprune as gp
    from graphprune.capture.export import capture_vision
    from graphprune.families import family_of
    from graphprune.tools import family_zoo
    from graphprune.tools.timing import interleaved

    model = build(args.tower)
    family = family_of(model)
    for size in [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]:
        ex = family_zoo.example(model, batch=1, items=("image",), image_size=size, seed=1)
        fns, notes = {}, {}
        for name, spec in METHODS.items():
            pruned = gp.prune(model, spec)
            pruned(**ex.as_kwargs())
            stage, results = pruned.program.buckets[list(pruned.program.buckets)[-1]]
            notes[name] = [pl.get("encoder_rows", "masked") for r in results for pl in r.info.get("plans", [r.info])]
            fns[name] = stage.gm
        bucket = list(pruned.program.buckets)[-1]
        unpruned = capture_vision(family, bucket=bucket)
        fns = {"unpruned": unpruned.gm, **fns}
        pixels = unpruned.check_inputs[0][:1]          # one image's crops
        times = interleaved({k: (lambda gm=gm: gm(pixels)) for k, gm in fns.items()}, args.repeats)
        print(f"image {size[0]}x{size[1]} ({bucket}), pixels {tuple(pixels.shape)}")
        for k, t in times.items():
            ratio = "" if k == "unpruned" else f"  x{times['unpruned'] / t:.2f} vs unpruned"
            print(f"  {k:14s} {t * 1e3:8.2f} ms{ratio}")
            for note in notes.get(k, []):
                print(f"      {note}")


if __name__ == "__main__":
    main()
