"""Reference outputs of the vision teachers, computed by onnxruntime (the test fixtures of
whittle's own forward passes).

    python tools/vision_fixture.py dinov2 PATH/vit_s_focus.onnx OUT.json
    python tools/vision_fixture.py open_nsfw PATH/open_nsfw.onnx OUT.json

The input image is a formula (both sides compute it in f64 and round to f32), so the fixture
stores only outputs: a few whole token rows of the backbone's last hidden state (after its
final LayerNorm) and the sums of the whole tensor. Needs: onnx, onnxruntime, numpy.
"""
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort


def formula_image(channels, height, width):
    """x[c, h, w] = 2 sin(0.05 (h + 1)(c + 1) + 0.03 w) - 0.5 cos(0.11 w h / 7 + c)."""
    c, h, w = np.meshgrid(
        np.arange(channels, dtype=np.float64),
        np.arange(height, dtype=np.float64),
        np.arange(width, dtype=np.float64),
        indexing="ij",
    )
    x = 2.0 * np.sin(0.05 * (h + 1.0) * (c + 1.0) + 0.03 * w) - 0.5 * np.cos(0.11 * w * h / 7.0 + c)
    return x.astype(np.float32)


def run_with_output(path, output, feeds):
    model = onnx.load(path)
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(output))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run([output], feeds)[0]


def dinov2(path, out):
    size = 224
    image = formula_image(3, size, size)[None]
    hidden = run_with_output(path, "/backbone/layernorm/Add_1_output_0", {"input_image": image})[0]
    rows = [0, 1, 17, 128, hidden.shape[0] - 1]
    fixture = {
        "teacher": "dinov2",
        "image_size": size,
        "shape": list(hidden.shape),
        "rows": {str(r): hidden[r].astype(float).tolist() for r in rows},
        "sum": float(hidden.astype(np.float64).sum()),
        "abs_sum": float(np.abs(hidden.astype(np.float64)).sum()),
        "onnxruntime": ort.__version__,
    }
    with open(out, "w") as f:
        json.dump(fixture, f)


def open_nsfw(path, out):
    """ResNet-50-thin of Yahoo's Open-NSFW: NHWC BGR input minus the VGG means (a pixel scale, so
    the formula is multiplied by 50); the pooled 1024-d feature and the two-class softmax."""
    size = 224
    image = (50.0 * formula_image(3, size, size)).transpose(1, 2, 0)[None].copy()
    pooled = run_with_output(path, "/ReduceMean_output_0", {"input_0": image})[0]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    probs = session.run(None, {"input_0": image})[0][0]
    fixture = {
        "teacher": "open_nsfw",
        "image_size": size,
        "input_scale": 50.0,
        "pooled": pooled.astype(float).tolist(),
        "probabilities": probs.astype(float).tolist(),
        "onnxruntime": ort.__version__,
    }
    with open(out, "w") as f:
        json.dump(fixture, f)


if __name__ == "__main__":
    teacher, path, out = sys.argv[1:4]
    {"dinov2": dinov2, "open_nsfw": open_nsfw}[teacher](path, out)
