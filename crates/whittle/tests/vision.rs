//! The vision teachers' forward passes against onnxruntime's outputs on the same input (stored
//! fixtures made by `tools/vision_fixture.py`), and the ONNX reader on the real files.

use candle_core::{Device, Tensor};
use whittle::io::fetch;
use whittle::vision::dinov2;

/// The fixture's input: x[c, h, w] = 2 sin(0.05 (h + 1)(c + 1) + 0.03 w) − 0.5 cos(0.11 w h / 7
/// + c), in f64 rounded to f32 (as numpy computes it).
fn formula_image(channels: usize, size: usize) -> Tensor {
    let mut v = Vec::with_capacity(channels * size * size);
    for c in 0..channels {
        for h in 0..size {
            for w in 0..size {
                let (c, h, w) = (c as f64, h as f64, w as f64);
                let x = 2.0 * (0.05 * (h + 1.0) * (c + 1.0) + 0.03 * w).sin()
                    - 0.5 * (0.11 * w * h / 7.0 + c).cos();
                v.push(x as f32);
            }
        }
    }
    Tensor::from_vec(v, (1, channels, size, size), &Device::Cpu).unwrap()
}

/// The largest |got − want| of two equally long vectors.
fn max_abs_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, e)| (g - e).abs())
        .fold(0f32, f32::max)
}

fn fixture(name: &str) -> serde_json::Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn dinov2_matches_onnxruntime() {
    let path = fetch::cached(&fetch::DINOV2_SMALL).unwrap();
    let vit = dinov2::from_onnx(&path).unwrap();
    let c = &vit.config;
    assert_eq!(
        (c.width, c.layers, c.heads, c.patch, c.grid, c.mlp),
        (384, 12, 6, 14, 37, 1536)
    );
    let want = fixture("dinov2-vits14.json");
    let size = want["image_size"].as_u64().unwrap() as usize;
    let got = vit
        .forward(&formula_image(3, size))
        .unwrap()
        .squeeze(0)
        .unwrap();
    let shape: Vec<usize> = serde_json::from_value(want["shape"].clone()).unwrap();
    assert_eq!(got.dims(), &shape[..]);
    let rows: Vec<Vec<f32>> = got.to_vec2().unwrap();
    let mut worst = 0f32;
    for (r, values) in want["rows"].as_object().unwrap() {
        let values: Vec<f32> = serde_json::from_value(values.clone()).unwrap();
        let r: usize = r.parse().unwrap();
        for (g, e) in rows[r].iter().zip(&values) {
            worst = worst.max((g - e).abs());
        }
    }
    let sum: f64 = rows.iter().flatten().map(|&v| v as f64).sum();
    let abs_sum: f64 = rows.iter().flatten().map(|&v| v.abs() as f64).sum();
    eprintln!(
        "DINOv2 vs onnxruntime: max |diff| {worst:e}, sum {sum} vs {}",
        want["sum"]
    );
    assert!(worst <= 1e-4, "max abs diff {worst}");
    let close = |a: f64, b: &serde_json::Value| (a - b.as_f64().unwrap()).abs() <= 1e-6 * 198_166.0;
    assert!(close(sum, &want["sum"]) && close(abs_sum, &want["abs_sum"]));
}

/// DINOv2's CLS features separate Fashion-MNIST classes far above chance with k-NN, on a small
/// slice at 112 px (the real data path: IDX reading, resizing, ImageNet normalisation).
#[test]
fn dinov2_knn_on_fashion_mnist_slice() {
    use whittle::data::images::{read_mnist, Preprocess};
    let vit = dinov2::from_onnx(&fetch::cached(&fetch::DINOV2_SMALL).unwrap()).unwrap();
    let dir = fetch::deb_data(&fetch::FASHION_MNIST).unwrap();
    let dir = dir.as_path();
    let (train, test) = (
        read_mnist(dir, "train").unwrap(),
        read_mnist(dir, "t10k").unwrap(),
    );
    assert_eq!((train.images.len(), test.images.len()), (60_000, 10_000));
    let prep = Preprocess::imagenet(112);
    let features = |images: &[whittle::data::images::Image]| -> Vec<f32> {
        let mut out = Vec::new();
        for chunk in images.chunks(50) {
            let batch = prep.batch(&chunk.iter().collect::<Vec<_>>()).unwrap();
            let cls = vit.forward(&batch).unwrap().narrow(1, 0, 1).unwrap();
            out.extend(cls.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        out
    };
    let (n_train, n_test) = (500, 200);
    let train_f = features(&train.images[..n_train]);
    let test_f = features(&test.images[..n_test]);
    let acc = whittle::eval::knn::knn_accuracy(
        &train_f,
        &train.labels[..n_train],
        &test_f,
        &test.labels[..n_test],
        384,
        20,
    )
    .unwrap();
    eprintln!("DINOv2 ViT-S/14 k-NN on {n_train} / {n_test} Fashion-MNIST images at 112 px: {acc}");
    assert!(acc > 0.6, "k-NN accuracy {acc}");
}

/// Open-NSFW's ResNet-50-thin run by whittle's ONNX executor: pooled feature and class
/// probabilities against onnxruntime's.
#[test]
fn open_nsfw_graph_matches_onnxruntime() {
    let graph =
        whittle::vision::graph::Graph::load(&fetch::cached(&fetch::OPEN_NSFW).unwrap()).unwrap();
    let want = fixture("open-nsfw.json");
    let size = want["image_size"].as_u64().unwrap() as usize;
    let scale = want["input_scale"].as_f64().unwrap();
    // NCHW formula → NHWC, as the fixture feeds it.
    let image = (formula_image(3, size) * scale)
        .unwrap()
        .permute((0, 2, 3, 1))
        .unwrap();
    let image = image.contiguous().unwrap();
    let compare = |output: &str, key: &str| {
        let got: Vec<f32> = graph
            .run(&[("input_0", image.clone())], output)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want: Vec<f32> = serde_json::from_value(want[key].clone()).unwrap();
        let worst = max_abs_diff(&got, &want);
        eprintln!("Open-NSFW {key} vs onnxruntime: max |diff| {worst:e}");
        assert!(worst <= 1e-4, "{key}: max abs diff {worst}");
    };
    compare("/ReduceMean_output_0", "pooled");
    compare("4195", "probabilities");
}

/// EfficientNet-Lite0 read from its legacy PyTorch pickle (strided channels-last views) and run
/// by whittle against an independent numpy float64 forward of the same file.
#[test]
fn effnet_lite0_matches_the_numpy_reference() {
    let net = whittle::vision::efficientnet::EfficientNetLite::load(
        &fetch::cached(&fetch::EFFNET_LITE0).unwrap(),
    )
    .unwrap();
    let want = fixture("effnet-lite0.json");
    let size = want["image_size"].as_u64().unwrap() as usize;
    let got: Vec<f32> = net
        .forward(&formula_image(3, size))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let pooled: Vec<f32> = serde_json::from_value(want["pooled"].clone()).unwrap();
    let worst = max_abs_diff(&got, &pooled);
    eprintln!("EfficientNet-Lite0 vs numpy: max |diff| {worst:e}");
    assert!(worst <= 1e-4, "max abs diff {worst}");
}
