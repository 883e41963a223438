//! `whittle vision distill`: the multi-teacher distillation run (data, teacher-feature cache,
//! training loop with checkpoints, final evaluation). The algorithm is in
//! `whittle::vision::distill`; this file parses, reports and writes files.

use crate::report::{progress, table, write_json};
use crate::vision::load;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};
use std::time::Instant;
use whittle::data::images::{png_files, read_mnist, read_png, Image, Labelled, Preprocess};
use whittle::distill::normalizer::NormKind;
use whittle::eval::probe::feature_accuracies;
use whittle::io::fetch;
use whittle::train::optim::AdamWConfig;
use whittle::vision::distill::{
    fidelity, vit_tiny, DistillConfig, Distiller, TargetShape, TeacherTargets,
};
use whittle::vision::teachers::Teacher;

#[derive(clap::Args)]
pub struct DistillArgs {
    /// Teachers, comma-separated: dinov2, open_nsfw, effnet_lite0.
    #[arg(long, value_delimiter = ',', required = true)]
    teachers: Vec<String>,
    /// A teacher's file instead of the fetched one, as NAME=PATH (repeatable).
    #[arg(long)]
    teacher_file: Vec<String>,
    /// Training images: PNG files or folders searched recursively (unreadable files are skipped
    /// and counted).
    #[arg(long)]
    images: Vec<PathBuf>,
    /// Also train on the first N Fashion-MNIST training images.
    #[arg(long, default_value_t = 0)]
    mnist_train: usize,
    /// Fashion-MNIST folder (default: the Debian package's, else fetched).
    #[arg(long)]
    mnist: Option<PathBuf>,
    /// The student: vit-tiny (ViT-Tiny/16).
    #[arg(long, default_value = "vit-tiny")]
    student: String,
    /// The student's input side in pixels (a multiple of 16); teachers see their own size.
    #[arg(long, default_value_t = 112)]
    size: usize,
    /// Also distil the per-patch features of teachers that have them (DINOv2), resized to the
    /// student's patch grid, with a per-patch head.
    #[arg(long)]
    dense: bool,
    /// Target standardisation: phis, none, global, channel, pca-white, zca, hca.
    #[arg(long, default_value = "phis")]
    norm: String,
    #[arg(long)]
    steps: u64,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0.05)]
    weight_decay: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Checkpoint every N steps (and at the end or when the time budget is spent).
    #[arg(long, default_value_t = 100)]
    ckpt_every: u64,
    /// Stop with a checkpoint after this many minutes; the same command resumes.
    #[arg(long)]
    max_minutes: Option<f64>,
    /// Final k-NN evaluation: the first N Fashion-MNIST training images are the memory...
    #[arg(long, default_value_t = 2000)]
    eval_train: usize,
    /// ...and the first N test images are classified (also the held-out images of fidelity).
    #[arg(long, default_value_t = 1000)]
    eval_test: usize,
    /// Fidelity to the teachers on the first N of those test images only (default: all
    /// --eval-test of them): k-NN on the whole test split needs only the student's features,
    /// fidelity needs every teacher's as well.
    #[arg(long)]
    fidelity_images: Option<usize>,
    /// Folder of the teachers' cached features (default OUT/teachers): runs that differ only
    /// in student settings (e.g. --norm) share one.
    #[arg(long)]
    teacher_cache: Option<PathBuf>,
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Where an image comes from (kept so teachers can re-read it at their own size).
#[derive(Clone)]
enum Source {
    Png(PathBuf),
    MnistTrain(usize),
    MnistTest(usize),
}

/// Fashion-MNIST's two splits.
struct Mnist {
    train: Labelled,
    test: Labelled,
}

impl Source {
    fn key(&self) -> String {
        match self {
            Source::Png(p) => p.display().to_string(),
            Source::MnistTrain(i) => format!("fashion-mnist:train:{i}"),
            Source::MnistTest(i) => format!("fashion-mnist:test:{i}"),
        }
    }

    fn read(&self, mnist: &Mnist) -> whittle::Result<Image> {
        match self {
            Source::Png(p) => read_png(p),
            Source::MnistTrain(i) => Ok(mnist.train.images[*i].clone()),
            Source::MnistTest(i) => Ok(mnist.test.images[*i].clone()),
        }
    }
}

fn resized(img: &Image, size: usize) -> Image {
    Image {
        height: size,
        width: size,
        rgb: whittle::vision::resize::resize_cubic(&img.rgb, 3, img.height, img.width, size, size)
            .into_iter()
            .map(|v| v.clamp(0.0, 1.0))
            .collect(),
    }
}

/// The digest of a list of image sources: what a cache made from them is keyed by.
fn sources_digest(sources: &[Source]) -> String {
    let keys: Vec<String> = sources.iter().map(Source::key).collect();
    whittle::dist::digest(keys.join("\n").as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The readable `sources` (unreadable ones skipped, with their errors) and their images at
/// `size`², from `dir`/student-SIZE.* when they were read from the same sources, else read and
/// stored there: decoding and resizing 1,671 PNGs took 2.5 minutes of each 14-minute run.
fn student_images(
    sources: Vec<Source>,
    mnist: &Mnist,
    size: usize,
    dir: &Path,
) -> Result<(Vec<Source>, Vec<Image>, Vec<String>)> {
    let (st, meta) = (
        dir.join(format!("student-{size}.safetensors")),
        dir.join(format!("student-{size}.json")),
    );
    let digest = sources_digest(&sources);
    let kept_sources =
        |kept: &[usize]| -> Vec<Source> { kept.iter().map(|&i| sources[i].clone()).collect() };
    let cached = std::fs::read_to_string(&meta)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .filter(|m| m["digest"] == digest.as_str() && m["size"] == size);
    if let Some(m) = cached {
        let kept: Vec<usize> = serde_json::from_value(m["kept"].clone())?;
        let skipped: Vec<String> = serde_json::from_value(m["skipped"].clone())?;
        let t = candle_core::safetensors::load(&st, &Device::Cpu)?;
        let pixels = t.get("images").context("cached student images")?;
        let per = 3 * size * size;
        let values = pixels.flatten_all()?.to_vec1::<f32>()?;
        if values.len() != kept.len() * per || kept.iter().any(|&i| i >= sources.len()) {
            bail!("{}: does not match {}", st.display(), meta.display());
        }
        let images = values
            .chunks_exact(per)
            .map(|rgb| Image {
                height: size,
                width: size,
                rgb: rgb.to_vec(),
            })
            .collect();
        return Ok((kept_sources(&kept), images, skipped));
    }
    let pb = progress(sources.len(), "reading images");
    let (mut kept, mut images, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
    for (i, s) in sources.iter().enumerate() {
        match s.read(mnist) {
            Ok(img) => {
                images.push(resized(&img, size));
                kept.push(i);
            }
            Err(e) => skipped.push(e.to_string()),
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    std::fs::create_dir_all(dir)?;
    let values: Vec<f32> = images
        .iter()
        .flat_map(|im| im.rgb.iter().copied())
        .collect();
    let tensors = std::collections::HashMap::from([(
        "images".to_string(),
        Tensor::from_vec(values, (images.len(), 3, size, size), &Device::Cpu)?,
    )]);
    whittle::io::atomic::write_file(&st, |tmp| {
        candle_core::safetensors::save(&tensors, tmp).map_err(whittle::Error::from)
    })?;
    let m = serde_json::json!({ "size": size, "digest": digest, "kept": kept, "skipped": skipped });
    whittle::io::atomic::write_bytes(&meta, serde_json::to_string(&m)?.as_bytes())?;
    Ok((kept_sources(&kept), images, skipped))
}

/// One target's raw features: name, `images × tokens × dim` values, dim, tokens.
type RawTarget = (String, Vec<f32>, usize, usize);

/// A teacher's features of `sources` — its summary, and with `dense_grid` = g its per-patch
/// features resized (bicubic) to a g × g grid — from `dir`/NAME.* when they were computed for
/// the same images, size and grid, else computed (progress with images/s) and stored there.
fn teacher_features(
    teacher: &Teacher,
    sources: &[Source],
    mnist: &Mnist,
    dir: &Path,
    dense_grid: Option<usize>,
) -> Result<Vec<RawTarget>> {
    let name = teacher.kind.name();
    let (st, meta) = (
        dir.join(format!("{name}.safetensors")),
        dir.join(format!("{name}.json")),
    );
    let digest = sources_digest(sources);
    let mut want = serde_json::json!({ "teacher": name, "size": teacher.size, "images": sources.len(), "digest": digest });
    if let Some(g) = dense_grid {
        want["dense_grid"] = g.into();
    }
    let targets = |summary: &Tensor, dense: Option<&Tensor>| -> Result<Vec<RawTarget>> {
        let mut out = vec![(
            name.to_string(),
            summary.flatten_all()?.to_vec1()?,
            summary.dim(1)?,
            1,
        )];
        if let (Some(d), Some(g)) = (dense, dense_grid) {
            out.push((
                format!("{name}.dense"),
                d.flatten_all()?.to_vec1()?,
                d.dim(2)?,
                g * g,
            ));
        }
        Ok(out)
    };
    if let Ok(text) = std::fs::read_to_string(&meta) {
        if serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .as_ref()
            == Some(&want)
        {
            let t = candle_core::safetensors::load(&st, &Device::Cpu)?;
            let summary = t.get("features").context("cached teacher features")?;
            return targets(summary, t.get("dense"));
        }
    }
    let pb = progress(sources.len(), &format!("{name} features"));
    let start = Instant::now();
    let (mut summary, mut dense) = (Vec::new(), Vec::new());
    let (mut dim, mut tokens) = (0, 0);
    for chunk in sources.chunks(16) {
        let images = chunk
            .iter()
            .map(|s| s.read(mnist))
            .collect::<whittle::Result<Vec<_>>>()?;
        let f = teacher.features(&images.iter().collect::<Vec<_>>())?;
        dim = f.summary.dim(1)?;
        summary.extend(f.summary.flatten_all()?.to_vec1::<f32>()?);
        if let Some(g) = dense_grid {
            let patches = f
                .dense
                .with_context(|| format!("teacher {name} has no per-patch features"))?;
            let (b, p, d) = patches.dims3()?;
            let side = (p as f64).sqrt().round() as usize;
            // Each image's [p, d] tokens as d planes of side × side, resized to g × g.
            for i in 0..b {
                let planes = patches
                    .get(i)?
                    .t()?
                    .contiguous()?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let small = whittle::vision::resize::resize_cubic(&planes, d, side, side, g, g);
                let t = Tensor::from_vec(small, (d, g * g), &Device::Cpu)?.t()?;
                dense.extend(t.flatten_all()?.to_vec1::<f32>()?);
            }
            tokens = g * g;
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    eprintln!(
        "{name}: {} images in {:.0} s ({:.1} images/s)",
        sources.len(),
        start.elapsed().as_secs_f64(),
        sources.len() as f64 / start.elapsed().as_secs_f64()
    );
    std::fs::create_dir_all(dir)?;
    let n = sources.len();
    let mut tensors = std::collections::HashMap::from([(
        "features".to_string(),
        Tensor::from_vec(summary, (n, dim), &Device::Cpu)?,
    )]);
    if dense_grid.is_some() {
        let d = dense.len() / (n * tokens).max(1);
        tensors.insert(
            "dense".to_string(),
            Tensor::from_vec(dense, (n, tokens, d), &Device::Cpu)?,
        );
    }
    whittle::io::atomic::write_file(&st, |tmp| {
        candle_core::safetensors::save(&tensors, tmp).map_err(whittle::Error::from)
    })?;
    whittle::io::atomic::write_bytes(&meta, serde_json::to_string(&want)?.as_bytes())?;
    targets(&tensors["features"], tensors.get("dense"))
}

pub fn run(a: &DistillArgs) -> Result<()> {
    if a.student != "vit-tiny" {
        bail!("--student {}: whittle has vit-tiny", a.student);
    }
    let norm = NormKind::parse(&a.norm)?;
    let mnist_dir = match &a.mnist {
        Some(d) => d.clone(),
        None => fetch::deb_data(&fetch::FASHION_MNIST)?,
    };
    let mnist = Mnist {
        train: read_mnist(&mnist_dir, "train")?,
        test: read_mnist(&mnist_dir, "t10k")?,
    };
    let (n_train, n_test) = (mnist.train.images.len(), mnist.test.images.len());
    if a.mnist_train > n_train || a.eval_train > n_train || a.eval_test > n_test {
        bail!("--mnist-train / --eval-train / --eval-test exceed Fashion-MNIST's {n_train} / {n_test} images");
    }
    if a.fidelity_images.is_some_and(|n| n == 0 || n > a.eval_test) {
        bail!(
            "--fidelity-images must be between 1 and --eval-test ({})",
            a.eval_test
        );
    }
    // Training images: read once (unreadable ones skipped and counted), kept at the student's
    // size, and cached beside the teachers' features for the next run.
    let cache = a
        .teacher_cache
        .clone()
        .unwrap_or_else(|| a.out.join("teachers"));
    let mut sources: Vec<Source> = png_files(&a.images)?.into_iter().map(Source::Png).collect();
    sources.extend((0..a.mnist_train).map(Source::MnistTrain));
    let (kept, student_images, skipped) = student_images(sources, &mnist, a.size, &cache)?;
    if !skipped.is_empty() {
        eprintln!(
            "skipped {} unreadable images; the first: {}",
            skipped.len(),
            skipped[0]
        );
    }
    if kept.len() < a.batch {
        bail!(
            "{} training images for batches of {}: add --images or --mnist-train",
            kept.len(),
            a.batch
        );
    }
    eprintln!(
        "training images: {} ({} skipped)",
        kept.len(),
        skipped.len()
    );
    // Teachers' features (cached), then their normalisers.
    let mut teachers = Vec::new();
    let mut targets = Vec::new();
    for name in &a.teachers {
        let teacher = load(name, &a.teacher_file, None)?;
        for (target, features, dim, tokens) in
            teacher_features(&teacher, &kept, &mnist, &cache, dense_grid(a, &teacher))?
        {
            targets.push(TeacherTargets::new(&target, dim, tokens, features, norm)?);
        }
        teachers.push(teacher);
    }
    let config = DistillConfig {
        student: vit_tiny(a.size),
        size: a.size,
        norm,
        steps: a.steps,
        batch: a.batch,
        lr: a.lr,
        min_lr: a.lr / 100.0,
        warmup: (a.steps / 20).max(1),
        adamw: AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: a.weight_decay,
        },
        clip: 1.0,
        seed: a.seed,
        ckpt_every: a.ckpt_every,
        teachers: targets.iter().map(|t| t.name.clone()).collect(),
    };
    let shapes: Vec<TargetShape> = targets.iter().map(TargetShape::from).collect();
    let mut d = if Distiller::has_checkpoint(&a.out) {
        let d = Distiller::resume(&a.out, config, &shapes)?;
        eprintln!("resuming at step {} of {}", d.step, a.steps);
        d
    } else {
        Distiller::new(config, &shapes)?
    };
    let prep = Preprocess::imagenet(a.size);
    let started = Instant::now();
    let pb = progress(a.steps as usize, "distill");
    pb.set_position(d.step);
    while d.step < a.steps {
        if a.max_minutes
            .is_some_and(|m| started.elapsed().as_secs_f64() > 60.0 * m)
        {
            d.save(&a.out)?;
            pb.finish_and_clear();
            println!(
                "time budget spent at step {}; run the same command again to resume",
                d.step
            );
            return Ok(());
        }
        let rows = d.batch_indices(d.step, student_images.len());
        let pixels = prep.batch(&rows.iter().map(|&r| &student_images[r]).collect::<Vec<_>>())?;
        let row = d.train_step(&pixels, &rows, &targets)?;
        pb.set_position(d.step);
        pb.set_message(format!(
            "distill loss {:.4} {:.1} img/s",
            row.loss, row.images_per_s
        ));
        if d.config.ckpt_every > 0 && d.step % d.config.ckpt_every == 0 {
            d.save(&a.out)?;
        }
    }
    pb.finish_and_clear();
    d.save(&a.out)?;
    report(a, &d, &teachers, &targets, &mnist, &cache)
}

/// The student's patch grid when `--dense` asks for the teacher's per-patch features.
fn dense_grid(a: &DistillArgs, teacher: &Teacher) -> Option<usize> {
    (a.dense && teacher.kind.has_dense()).then_some(a.size / 16)
}

/// The run's final measures: loss shares, the student's k-NN accuracy, per-target fidelity on
/// held-out images (the first --eval-test Fashion-MNIST test images).
fn report(
    a: &DistillArgs,
    d: &Distiller,
    teachers: &[Teacher],
    targets: &[TeacherTargets],
    mnist: &Mnist,
    cache: &Path,
) -> Result<()> {
    // Loss shares over the last tenth of the run.
    let tail = &d.log[d.log.len() - (d.log.len() / 10).max(1)..];
    let mean_loss: Vec<f64> = (0..targets.len())
        .map(|t| tail.iter().map(|r| r.teacher_loss[t]).sum::<f64>() / tail.len() as f64)
        .collect();
    let total: f64 = mean_loss.iter().sum();
    // Student features: k-NN, and predictions on the held-out test images (from the same
    // forward pass).
    let prep = Preprocess::imagenet(a.size);
    let student = |images: &[Image], label: &str, predict: bool| {
        let (mut summary, mut preds) = (Vec::new(), vec![Vec::new(); targets.len()]);
        let pb = progress(images.len(), label);
        for chunk in images.chunks(64) {
            let pixels = prep.batch(&chunk.iter().collect::<Vec<_>>())?;
            let tokens = d.student.forward(&pixels)?;
            summary.extend(tokens.narrow(1, 0, 1)?.flatten_all()?.to_vec1::<f32>()?);
            if predict {
                for (p, t) in d.predict_from(&tokens)?.into_iter().zip(preds.iter_mut()) {
                    t.extend(p.flatten_all()?.to_vec1::<f32>()?);
                }
            }
            pb.inc(chunk.len() as u64);
        }
        pb.finish_and_clear();
        Ok::<_, anyhow::Error>((summary, preds))
    };
    let (train_f, _) = student(&mnist.train.images[..a.eval_train], "student train", false)?;
    let (test_f, preds) = student(&mnist.test.images[..a.eval_test], "student test", true)?;
    let (knn, probe) = feature_accuracies(
        &train_f,
        &mnist.train.labels[..a.eval_train],
        &test_f,
        &mnist.test.labels[..a.eval_test],
        d.config.student.width,
        20,
    )?;
    // The teachers' own features of the held-out images (cached beside the training ones).
    let n_fidelity = a.fidelity_images.unwrap_or(a.eval_test);
    let heldout: Vec<Source> = (0..n_fidelity).map(Source::MnistTest).collect();
    let mut raw = std::collections::HashMap::new();
    for teacher in teachers {
        for (name, features, _, _) in teacher_features(
            teacher,
            &heldout,
            mnist,
            &cache.join("heldout"),
            dense_grid(a, teacher),
        )? {
            raw.insert(name, features);
        }
    }
    let mut rows = Vec::new();
    let mut per_target = Vec::new();
    for ((t, pred), loss) in targets.iter().zip(&preds).zip(&mean_loss) {
        let per_image = pred.len() / a.eval_test;
        let (cos, nmse) = fidelity(&pred[..n_fidelity * per_image], t, &raw[&t.name]);
        rows.push(vec![
            t.name.clone(),
            format!("{loss:.4}"),
            format!("{:.1}", 100.0 * loss / total),
            format!("{cos:.4}"),
            format!("{nmse:.4}"),
        ]);
        per_target.push(serde_json::json!({ "teacher": t.name, "loss": loss, "loss_share": loss / total, "cosine": cos, "normalised_mse": nmse }));
    }
    println!(
        "student vit-tiny at {} px, --norm {}, {} steps of {}:",
        a.size, a.norm, d.step, a.batch
    );
    table(
        &[
            "target",
            "loss (last 10 %)",
            "share %",
            "fidelity cos",
            "fidelity nMSE",
        ],
        &rows,
    );
    println!(
        "student on Fashion-MNIST, {} / {} images: k-NN (k = 20) {:.2} %, linear probe {:.2} % \
         (fidelity on the first {n_fidelity} test images)",
        a.eval_train,
        a.eval_test,
        100.0 * knn,
        100.0 * probe
    );
    let summary = serde_json::json!({
        "config": d.config, "steps": d.step, "knn_accuracy": knn, "probe_accuracy": probe, "eval_images": [a.eval_train, a.eval_test], "fidelity_images": n_fidelity, "teachers": per_target, "log": d.log,
    });
    write_json(&a.out.join("summary.json"), &summary)?;
    if let Some(p) = &a.json {
        write_json(p, &summary)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The second read of the same sources comes from the cache, identical to the first: the
    /// same images, the same sources kept, the same unreadable file reported; other sources or
    /// another size read afresh.
    #[test]
    fn student_images_are_cached_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let gray = |v: u8| Image::from_gray(28, 28, &[v; 28 * 28]);
        let mnist = Mnist {
            train: Labelled {
                images: vec![gray(10), gray(200), gray(90)],
                labels: vec![0, 1, 2],
            },
            test: Labelled {
                images: vec![],
                labels: vec![],
            },
        };
        let sources = vec![
            Source::MnistTrain(0),
            Source::Png(dir.path().join("missing.png")),
            Source::MnistTrain(2),
        ];
        let read = |sources: Vec<Source>, size| {
            let (kept, images, skipped) =
                student_images(sources, &mnist, size, dir.path()).unwrap();
            let keys: Vec<String> = kept.iter().map(Source::key).collect();
            let pixels: Vec<Vec<f32>> = images.into_iter().map(|i| i.rgb).collect();
            (keys, pixels, skipped)
        };
        let first = read(sources.clone(), 16);
        assert!(dir.path().join("student-16.json").is_file());
        assert_eq!(first.0.len(), 2);
        assert_eq!(first.2.len(), 1);
        assert_eq!(read(sources.clone(), 16), first);
        let other = read(sources[..1].to_vec(), 16);
        assert_eq!(other.1[0], first.1[0]);
        assert_eq!(other.0.len(), 1);
        assert_eq!(read(sources, 8).1[0].len(), 3 * 8 * 8);
    }
}
