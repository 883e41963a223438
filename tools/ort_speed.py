"""Images per second of a vision teacher's ONNX graph under onnxruntime (CPU), up to its
feature output: the reference whittle's teacher forward is compared with (BENCHMARKS.md).

    python tools/ort_speed.py dinov2|open_nsfw PATH.onnx --threads 2 --batch 32 --reps 3

Needs: onnx, onnxruntime, numpy.
"""
import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort

TEACHERS = {
    # name: (input, feature output, NHWC?)
    "dinov2": ("input_image", "/backbone/layernorm/Add_1_output_0", False),
    "open_nsfw": ("input_0", "/ReduceMean_output_0", True),
}

def main():
    p = argparse.ArgumentParser()
    p.add_argument("teacher", choices=TEACHERS)
    p.add_argument("path")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    name, output, nhwc = TEACHERS[a.teacher]
    model = onnx.load(a.path)
    # The feature is the only output, so the optimiser drops what follows it.
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(output))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = a.threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    shape = (a.batch, a.size, a.size, 3) if nhwc else (a.batch, 3, a.size, a.size)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    session.run([output], {name: x})
    best = float("inf")
    for _ in range(a.reps):
        t = time.perf_counter()
        session.run([output], {name: x})
        best = min(best, time.perf_counter() - t)
    print(f"{a.teacher} onnxruntime {ort.__version__} threads {a.threads} batch {a.batch} "
          f"size {a.size}: {a.batch / best:.1f} images/s")

if __name__ == "__main__":
    main()
