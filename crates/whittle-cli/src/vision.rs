//! `whittle vision ...`: the vision encoders' commands.

use crate::report::{progress, table, write_json};
use anyhow::{bail, Result};
use std::path::PathBuf;
use std::time::Instant;
use whittle::data::images::{read_mnist, Image};
use whittle::eval::probe::feature_accuracies;
use whittle::io::fetch;
use whittle::vision::teachers::{Teacher, TeacherKind};

#[derive(clap::Subcommand)]
pub enum VisionCommand {
    /// k-NN (k = 20, cosine, DINO's weighted vote) and linear-probe accuracy of the teachers'
    /// summary features on Fashion-MNIST, and their forward speed.
    Eval(EvalArgs),
    /// Forward speed of the teachers (images/s, best of --reps batches; features only, after
    /// preprocessing), to set beside `tools/ort_speed.py` on the same CPU and threads.
    Bench(BenchArgs),
    /// Distil the teachers' summary features into a student ViT (one head per teacher, the
    /// targets standardised by --norm); resumable from OUT/checkpoint; ends with the student's
    /// k-NN accuracy on Fashion-MNIST and its fidelity to each teacher.
    Distill(crate::vision_distill::DistillArgs),
}

#[derive(clap::Args)]
pub struct BenchArgs {
    #[arg(long, value_delimiter = ',', required = true)]
    teachers: Vec<String>,
    #[arg(long)]
    teacher_file: Vec<String>,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    #[arg(long)]
    size: Option<usize>,
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Teachers, comma-separated: dinov2, open_nsfw, effnet_lite0.
    #[arg(long, value_delimiter = ',', required = true)]
    teachers: Vec<String>,
    /// A teacher's file instead of the fetched one, as NAME=PATH (repeatable).
    #[arg(long)]
    teacher_file: Vec<String>,
    /// Fashion-MNIST folder with the IDX files (default: the Debian package's, else fetched).
    #[arg(long)]
    mnist: Option<PathBuf>,
    /// The first N training images are the k-NN memory.
    #[arg(long, default_value_t = 10_000)]
    train_images: usize,
    /// The first N test images are classified.
    #[arg(long, default_value_t = 10_000)]
    test_images: usize,
    /// Input side in pixels (default: each teacher's own, 224).
    #[arg(long)]
    size: Option<usize>,
    #[arg(long, default_value_t = 20)]
    k: usize,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(serde::Serialize)]
struct EvalRow {
    teacher: &'static str,
    size: usize,
    dim: usize,
    knn_accuracy: f64,
    probe_accuracy: f64,
    images_per_s: f64,
}

pub fn run(cmd: &VisionCommand) -> Result<()> {
    match cmd {
        VisionCommand::Eval(args) => eval(args),
        VisionCommand::Bench(args) => bench(args),
        VisionCommand::Distill(args) => crate::vision_distill::run(args),
    }
}

pub fn load(spec: &str, files: &[String], size: Option<usize>) -> Result<Teacher> {
    let kind = TeacherKind::parse(spec)?;
    let mut teacher = Teacher::load(kind, teacher_path(files, kind)?.as_deref())?;
    if let Some(s) = size {
        teacher.size = s;
    }
    Ok(teacher)
}

fn bench(args: &BenchArgs) -> Result<()> {
    if args.batch == 0 || args.reps == 0 {
        bail!("--batch and --reps must be at least 1");
    }
    println!("threads: {}", whittle::threads::threads());
    let mut rows = Vec::new();
    for spec in &args.teachers {
        let teacher = load(spec, &args.teacher_file, args.size)?;
        // Images at the input size already, so the resize is an identity and costs nothing.
        let s = teacher.size;
        let image = Image {
            height: s,
            width: s,
            rgb: (0..3 * s * s)
                .map(|i| ((i * 7919) % 256) as f32 / 255.0)
                .collect(),
        };
        let batch: Vec<&Image> = vec![&image; args.batch];
        let prep = whittle::data::images::Preprocess {
            size: s,
            ..teacher.kind.preprocess()
        };
        let mut best = f64::INFINITY;
        for _ in 0..=args.reps {
            let pixels = prep.batch(&batch)?;
            let start = Instant::now();
            teacher.features_of(&pixels)?;
            best = best.min(start.elapsed().as_secs_f64());
        }
        rows.push(vec![
            teacher.kind.name().to_string(),
            s.to_string(),
            args.batch.to_string(),
            format!("{:.1}", args.batch as f64 / best),
        ]);
    }
    table(&["teacher", "size", "batch", "images/s"], &rows);
    Ok(())
}

pub fn teacher_path(files: &[String], kind: TeacherKind) -> Result<Option<PathBuf>> {
    for spec in files {
        let Some((name, path)) = spec.split_once('=') else {
            bail!("--teacher-file {spec}: expected NAME=PATH");
        };
        if TeacherKind::parse(name)? == kind {
            return Ok(Some(PathBuf::from(path)));
        }
    }
    Ok(None)
}

/// Summary features of `images`, batch by batch, with a progress bar; also the seconds taken.
pub fn summaries(
    teacher: &Teacher,
    images: &[Image],
    batch: usize,
    what: &str,
) -> Result<(Vec<f32>, usize, f64)> {
    let pb = progress(images.len(), what);
    let start = Instant::now();
    let (mut out, mut dim) = (Vec::new(), 0);
    for chunk in images.chunks(batch.max(1)) {
        let refs: Vec<&Image> = chunk.iter().collect();
        let summary = teacher.features(&refs)?.summary;
        dim = summary.dim(1)?;
        out.extend(summary.flatten_all()?.to_vec1::<f32>()?);
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    Ok((out, dim, start.elapsed().as_secs_f64()))
}

fn eval(args: &EvalArgs) -> Result<()> {
    let kinds: Vec<TeacherKind> = args
        .teachers
        .iter()
        .map(|t| TeacherKind::parse(t))
        .collect::<whittle::Result<_>>()?;
    let dir = match &args.mnist {
        Some(d) => d.clone(),
        None => fetch::deb_data(&fetch::FASHION_MNIST)?,
    };
    let (train, test) = (read_mnist(&dir, "train")?, read_mnist(&dir, "t10k")?);
    if args.train_images > train.images.len() || args.test_images > test.images.len() {
        bail!(
            "--train-images {} / --test-images {}: the split has {} / {}",
            args.train_images,
            args.test_images,
            train.images.len(),
            test.images.len()
        );
    }
    if args.k == 0 || args.k > args.train_images {
        bail!("--k {} with {} training images", args.k, args.train_images);
    }
    let (train_images, test_images) = (
        &train.images[..args.train_images],
        &test.images[..args.test_images],
    );
    let mut rows = Vec::new();
    for kind in kinds {
        let teacher = load(kind.name(), &args.teacher_file, args.size)?;
        let (train_f, dim, t1) = summaries(
            &teacher,
            train_images,
            args.batch,
            &format!("{} train", kind.name()),
        )?;
        let (test_f, _, t2) = summaries(
            &teacher,
            test_images,
            args.batch,
            &format!("{} test", kind.name()),
        )?;
        let (acc, probe) = feature_accuracies(
            &train_f,
            &train.labels[..args.train_images],
            &test_f,
            &test.labels[..args.test_images],
            dim,
            args.k,
        )?;
        rows.push(EvalRow {
            teacher: kind.name(),
            probe_accuracy: probe,
            size: teacher.size,
            dim,
            knn_accuracy: acc,
            images_per_s: (args.train_images + args.test_images) as f64 / (t1 + t2),
        });
    }
    println!(
        "Fashion-MNIST k-NN (k = {}): {} training images as memory, {} test images",
        args.k, args.train_images, args.test_images
    );
    table(
        &[
            "teacher",
            "size",
            "dim",
            "k-NN acc %",
            "probe acc %",
            "images/s",
        ],
        &rows
            .iter()
            .map(|r| {
                vec![
                    r.teacher.to_string(),
                    r.size.to_string(),
                    r.dim.to_string(),
                    format!("{:.2}", 100.0 * r.knn_accuracy),
                    format!("{:.2}", 100.0 * r.probe_accuracy),
                    format!("{:.1}", r.images_per_s),
                ]
            })
            .collect::<Vec<_>>(),
    );
    if let Some(path) = &args.json {
        write_json(
            path,
            &serde_json::json!({ "k": args.k, "train_images": args.train_images, "test_images": args.test_images, "rows": rows }),
        )?;
    }
    Ok(())
}
