//! The subcommands other than `bench`.

use crate::compress::JobArgs;
use crate::report::{advance, progress, table, write_json};
use anyhow::{Context, Result};
use serde_json::json;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use whittle::io::resolve::{self, Loaded, ModelSpec};
use whittle::model::sampling::{Sampler, SamplingConfig};
use whittle::model::KvCache;

/// The global options that change how a loaded model runs, not what it is.
#[derive(Default)]
pub struct LoadOptions {
    pub window_rule: Option<whittle::model::WindowRule>,
    pub kv_cache: Option<whittle::model::KvDtype>,
}

static LOAD_OPTIONS: std::sync::OnceLock<LoadOptions> = std::sync::OnceLock::new();

/// Sets the global `--window-rule` and `--kv-cache`, applied to every model the commands load.
pub fn set_load_options(options: LoadOptions) {
    let _ = LOAD_OPTIONS.set(options);
}

/// Loads a model from a resolved path, with the global load options applied.
pub fn load_model(path: &Path) -> Result<whittle::Model> {
    let mut model = resolve::load_model(path)?;
    if let Some(o) = LOAD_OPTIONS.get() {
        if let Some(rule) = o.window_rule {
            model.config.window_rule = rule;
        }
        if let Some(dtype) = o.kv_cache {
            model.config.kv_cache = dtype;
        }
    }
    Ok(model)
}

/// The `inspect` lines that say where a model came from: name, licence, base model, the
/// recipes of the whittle runs that made it, and the figures measured on it.
fn print_provenance(p: &whittle::model::Provenance) {
    let g = |k: &str| p.text(k).unwrap_or("-");
    println!(
        "source     {} · licence {} · {} general.* keys",
        g("general.name"),
        g("general.license"),
        p.general.len()
    );
    if let Some(b) = &p.base_model {
        println!("base model {b}");
    }
    for (i, r) in p.recipes.iter().enumerate() {
        let stages: Vec<String> = whittle::recipe::Recipe::describe_toml(r);
        println!("whittle    run {}: {}", i + 1, stages.join(" → "));
    }
    for f in &p.figures {
        let se = f.stderr.map_or(String::new(), |s| format!(" ± {s:.4}"));
        println!(
            "figure     {} {} = {:.4}{se} ({})",
            f.task, f.metric, f.value, f.setting
        );
    }
}

/// Resolves `--model` and loads the model alone, its provenance naming the source.
fn resolve_and_load(model: Option<&str>) -> Result<(PathBuf, whittle::Model)> {
    let spec = ModelSpec::parse(model)?;
    let path = spec.resolve()?;
    let mut m = load_model(&path)?;
    m.provenance.set_source(spec.identity(&path));
    Ok((path, m))
}

/// Resolves `--model` (fetching the default model if needed) and loads it.
pub fn load(model: Option<&str>) -> Result<Loaded> {
    let t = Instant::now();
    let (path, model) = resolve_and_load(model)?;
    let loaded = Loaded {
        tokenizer: resolve::load_tokenizer(&path, &model)?,
        model,
        path: path.clone(),
    };
    eprintln!(
        "loaded {} ({:.1} M parameters) in {:.1} s",
        path.display(),
        loaded.model.n_params() as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    Ok(loaded)
}

pub fn fetch() -> Result<()> {
    let path = whittle::io::fetch::default_model()?;
    println!("{}", path.display());
    Ok(())
}

pub fn inspect(model: Option<&str>, json_out: Option<PathBuf>) -> Result<()> {
    let (path, model) = resolve_and_load(model)?;
    // A checkpoint without a tokenizer can still be inspected.
    let tokenizer = resolve::load_tokenizer(&path, &model).ok();
    let c = &model.config;
    let mut modules: BTreeMap<String, usize> = BTreeMap::new();
    *modules.entry("embed_tokens".into()).or_default() += model.embed.n_params();
    *modules.entry("norms".into()).or_default() += model.final_norm.len();
    for l in &model.layers {
        *modules.entry("norms".into()).or_default() += l.attn_norm.len()
            + l.mlp_norm.len()
            + l.fusion.as_ref().map_or(0, |f| f[0].len() + f[1].len());
        if let Some(m) = &l.ssm {
            *modules
                .entry("mamba (conv, Δ bias, A, D, norms)".into())
                .or_default() += m.extra_params();
        }
        for (name, _, lin) in l.linears() {
            *modules.entry(name.to_string()).or_default() += lin.n_params();
        }
        for (name, e) in l.emulated.named() {
            *modules
                .entry(format!("emulated {name} updates"))
                .or_default() += e.n_params();
        }
    }
    if let Some(h) = &model.lm_head {
        modules.insert("lm_head".into(), h.n_params());
    }
    if !model.memory.is_empty() {
        modules.insert("memory_tokens".into(), model.memory.len());
    }
    let total = model.n_params();
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    for (_, dtype, _) in resolve::tensor_infos(&path)? {
        *dtypes.entry(dtype).or_default() += 1;
    }
    let size = resolve::size_on_disk(&path)?;
    let shapes: Vec<_> = model.layers.iter().map(|l| l.shape()).collect();
    println!("model      {}", path.display());
    println!(
        "arch       {} · {} layers · hidden {} · vocab {} · context {} · rope θ {} · tied head {}",
        c.arch.name(),
        shapes.len(),
        c.hidden,
        c.vocab_size,
        c.context_length,
        c.rope_theta,
        c.tie_embeddings
    );
    let distinct: std::collections::BTreeSet<String> =
        shapes.iter().map(|s| format!("{s:?}")).collect();
    for s in &distinct {
        let n = shapes.iter().filter(|x| &format!("{x:?}") == s).count();
        println!("layers     {n} × {s}");
    }
    if let Some(line) = attention_layout(&model) {
        println!("attention  {line}");
    }
    println!(
        "file       {:.1} MiB on disk · stored as {}",
        size as f64 / (1 << 20) as f64,
        dtypes
            .iter()
            .map(|(k, v)| format!("{k}×{v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    match &tokenizer {
        Some(t) => println!(
            "tokenizer  {} tokens · chat template {}",
            t.vocab_size(),
            if t.chat_template().is_some() {
                "yes"
            } else {
                "no"
            }
        ),
        None => println!("tokenizer  none in the checkpoint"),
    }
    print_provenance(&model.provenance);
    let cache = cache_figures(&model);
    println!(
        "cache      {} bytes/token · {:.2} MiB at {} tokens ({} meta tokens, f32 K/V and SSM state)",
        cache.per_token,
        cache.at_context as f64 / (1 << 20) as f64,
        cache.context,
        c.memory_tokens
    );
    let level = whittle::kernels::simd::level();
    let runs: Vec<_> = whittle::kernels::simd::Level::supported()
        .iter()
        .map(|l| l.name())
        .collect();
    println!(
        "cpu        {} · SIMD level {level} (this CPU runs {}; WHITTLE_SIMD forces one)",
        crate::baselines::cpu_name(),
        runs.join(", ")
    );
    println!();
    let mut rows: Vec<Vec<String>> = modules
        .iter()
        .map(|(k, v)| {
            vec![
                k.clone(),
                v.to_string(),
                format!("{:.2} %", 100.0 * *v as f64 / total as f64),
            ]
        })
        .collect();
    rows.push(vec!["total".into(), total.to_string(), "100 %".into()]);
    table(&["module", "parameters", "share"], &rows);
    if let Some(out) = json_out {
        write_json(
            &out,
            &json!({"path": path, "config": c, "layers": shapes, "parameters": modules,
                    "total_parameters": total, "bytes_on_disk": size, "tensor_types": dtypes,
                    "cache": {"bytes_per_token": cache.per_token, "context": cache.context,
                              "bytes_at_context": cache.at_context},
                    "cpu": crate::baselines::cpu_name(), "simd_level": level.name(),
                    "simd_levels_here": runs, "provenance": model.provenance}),
        )?;
    }
    Ok(())
}

/// Global vs sliding-window layers and cross-layer KV sharing, when the model has either.
fn attention_layout(model: &whittle::Model) -> Option<String> {
    use whittle::model::KvSource;
    let attn: Vec<_> = model
        .layers
        .iter()
        .enumerate()
        .filter_map(|(i, l)| l.attn.as_ref().map(|a| (i, a)))
        .collect();
    let global: Vec<usize> = attn
        .iter()
        .filter(|(_, a)| a.window.is_none())
        .map(|(i, _)| *i)
        .collect();
    let windows: std::collections::BTreeSet<usize> =
        attn.iter().filter_map(|(_, a)| a.window).collect();
    let shared: Vec<String> = attn
        .iter()
        .filter_map(|(i, a)| match a.kv {
            KvSource::Shared(p) => Some(format!("{i}←{p}")),
            KvSource::Own { .. } => None,
        })
        .collect();
    if windows.is_empty() && shared.is_empty() {
        return None;
    }
    Some(format!(
        "global layers {global:?} · sliding window {windows:?} elsewhere ({:?} decode rule) · KV shared {}",
        model.config.window_rule,
        if shared.is_empty() { "nowhere".to_string() } else { shared.join(", ") }
    ))
}

/// Decode-cache size of a model: bytes added per token (layers whose cache grows) and the total
/// at 8k tokens of context (or the model's whole context when shorter).
struct CacheFigures {
    per_token: usize,
    context: usize,
    at_context: usize,
}

fn cache_figures(model: &whittle::Model) -> CacheFigures {
    let room = model.config.context_length - model.config.memory_tokens;
    let context = room.min(8192);
    let at_context = KvCache::footprint(model, context);
    CacheFigures {
        per_token: at_context - KvCache::footprint(model, context - 1),
        context,
        at_context,
    }
}

pub fn eval_ppl(
    model: Option<&str>,
    data: &Path,
    seq_len: usize,
    max_tokens: Option<usize>,
    json_out: Option<PathBuf>,
) -> Result<()> {
    let text = whittle::data::text::read_text(data)?;
    let Loaded {
        model,
        tokenizer,
        path,
    } = load(model)?;
    let t = Instant::now();
    let ids = tokenizer.encode(&text)?;
    eprintln!(
        "tokenized {} ({} tokens) in {:.1} s",
        data.display(),
        ids.len(),
        t.elapsed().as_secs_f64()
    );
    let pb = progress(0, "perplexity");
    let report =
        whittle::eval::perplexity::perplexity(&model, &ids, seq_len, max_tokens, &mut advance(&pb))
            .with_context(|| format!("perplexity of {}", data.display()))?;
    pb.finish_and_clear();
    table(
        &["data", "seq", "windows", "predicted", "PPL", "tok/s"],
        &[vec![
            data.display().to_string(),
            report.seq_len.to_string(),
            report.windows.to_string(),
            report.predicted_tokens.to_string(),
            format!("{:.4}", report.ppl),
            format!("{:.0}", report.tokens_per_s),
        ]],
    );
    if let Some(out) = json_out {
        write_json(
            &out,
            &json!({"model": path, "data": data, "threads": whittle::threads::threads(),
                    "report": report}),
        )?;
    }
    Ok(())
}

pub fn eval_logits(model: Option<&str>, data: &Path, tokens: usize, json_out: &Path) -> Result<()> {
    let text = whittle::data::text::read_text(data)?;
    let Loaded {
        model, tokenizer, ..
    } = load(model)?;
    let mut ids = tokenizer.encode(&text)?;
    anyhow::ensure!(
        ids.len() >= tokens && tokens > 0,
        "{} has {} tokens, fewer than --tokens {tokens}",
        data.display(),
        ids.len()
    );
    ids.truncate(tokens);
    let logits = model.forward(&ids, None, whittle::model::Logits::All, None)?;
    let rows: Vec<&[f32]> = logits.chunks_exact(model.config.vocab_size).collect();
    write_json(json_out, &json!({"ids": ids, "logits": rows}))
}

pub fn eval_tasks(
    model: Option<&str>,
    args: &crate::tasks::TaskArgs,
    json_out: Option<PathBuf>,
) -> Result<()> {
    let mut args = args.clone();
    if args.tasks.is_empty() {
        args.tasks = vec!["all".into()];
    }
    // A bad task list fails before the model loads.
    args.parsed()?;
    let Loaded {
        model,
        tokenizer,
        path,
    } = load(model)?;
    let t = Instant::now();
    let reports = crate::tasks::evaluate(&model, &tokenizer, &args, "")?;
    crate::tasks::print(&reports);
    let seconds = t.elapsed().as_secs_f64();
    println!(
        "{:.0} s on {} ({} threads, SIMD level {})",
        seconds,
        crate::baselines::cpu_name(),
        whittle::threads::threads(),
        whittle::kernels::simd::level()
    );
    if let Some(out) = json_out {
        write_json(
            &out,
            &json!({"model": path, "shots": args.shots, "limit": args.limit,
                    "seconds": seconds, "cpu": crate::baselines::cpu_name(),
                    "threads": whittle::threads::threads(), "tasks": reports}),
        )?;
    }
    Ok(())
}

pub fn generate(
    model: Option<&str>,
    prompt: &str,
    chat: bool,
    max_new: usize,
    sampling: SamplingConfig,
) -> Result<()> {
    let mut sampler = Sampler::new(sampling)?;
    let Loaded {
        model, tokenizer, ..
    } = load(model)?;
    let text = if chat {
        tokenizer.render_chat(prompt)?
    } else {
        prompt.to_string()
    };
    let mut ids = tokenizer.encode(&text)?;
    if ids.is_empty() {
        // As other runners do: an empty prompt generates from the BOS token.
        let bos = tokenizer.bos.or(model.config.bos_token_id);
        ids.extend(bos);
        anyhow::ensure!(
            !ids.is_empty(),
            "the prompt is empty and the model has no BOS token to start from; give --prompt"
        );
    }
    // In chat mode the turn ends with <|im_end|>-style tokens; stop at the tokenizer's EOS.
    let eos = tokenizer.eos.or(model.config.eos_token_id);
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let mut stdout = std::io::stdout();
    let mut failed = None;
    // Decode the whole tail each time: a token can end in the middle of a UTF-8 character.
    let g =
        whittle::model::generate::generate(&model, &ids, max_new, &mut sampler, eos, &mut |tok| {
            generated.push(tok);
            match tokenizer.decode(&generated) {
                Ok(s) if !s.ends_with('\u{fffd}') => {
                    let _ = write!(stdout, "{}", &s[printed.min(s.len())..]);
                    let _ = stdout.flush();
                    printed = s.len();
                }
                Ok(_) => {}
                Err(e) => failed = Some(e),
            }
            failed.is_none()
        })?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    println!();
    let n = g.tokens.len();
    eprintln!(
        "{} prompt tokens in {:.2} s ({:.0} tok/s) · {} new tokens in {:.2} s ({:.1} tok/s){}",
        ids.len(),
        g.prefill_seconds,
        ids.len() as f64 / g.prefill_seconds,
        n,
        g.decode_seconds,
        n.saturating_sub(1) as f64 / g.decode_seconds.max(1e-9),
        if g.stopped_at_eos {
            " · stopped at EOS"
        } else {
            ""
        }
    );
    Ok(())
}

pub fn convert(model: Option<&str>, out: &Path, dtype: whittle::io::gguf::GgufType) -> Result<()> {
    let Loaded {
        model, tokenizer, ..
    } = load(model)?;
    let t = Instant::now();
    if out.extension().is_some_and(|e| e == "gguf") {
        whittle::io::gguf::save(&model, Some(&tokenizer.spec()?), dtype, out)?;
    } else {
        anyhow::ensure!(
            dtype == whittle::io::gguf::GgufType::F32,
            "--dtype applies to GGUF output (an --out ending in .gguf); HF folders are written in f32"
        );
        whittle::io::safetensors::save(&model, Some(&tokenizer), false, out)?;
    }
    eprintln!(
        "wrote {} in {:.1} s",
        out.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn compress_recipe(
    model: Option<&str>,
    recipe: &Path,
    eval: &crate::compress::EvalArgs,
    out: &Path,
    json_out: Option<PathBuf>,
) -> Result<()> {
    let recipe = whittle::recipe::Recipe::from_file(recipe)?;
    let settings = json!({"recipe": recipe});
    let job = JobArgs {
        calib: crate::compress::CalibArgs::from_spec(&recipe.calib),
        eval: eval.clone(),
        out: out.to_path_buf(),
        json: json_out,
    };
    let calibrate = recipe.needs_calibration();
    crate::compress::run(
        model,
        &job,
        &recipe,
        "recipe",
        true,
        calibrate,
        settings,
        &mut |m, windows, progress| {
            let reference = load(model)?.model;
            let stages = recipe.stages.len();
            let done = recipe.run(m, &reference, windows, &mut |s, d, t| {
                progress(s * t + d, stages * t)
            })?;
            let mut all = whittle::recipe::method::StageReport::default();
            let mut details = Vec::new();
            for (name, r) in done {
                eprintln!("stage {name}: {} linears", r.linears.len());
                all.notes
                    .extend(r.notes.into_iter().map(|n| format!("{name}: {n}")));
                all.linears.extend(r.linears);
                details.push(json!({"stage": name, "details": r.details}));
            }
            all.details = json!(details);
            Ok(all)
        },
    )
}
