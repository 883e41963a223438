//! The two file kinds the benchmark wheel ships, read into one shape: a list of JSON records.
//!
//! Hugging Face `datasets` saves splits as Arrow IPC *streams* (`data-00000-of-00001.arrow`); the
//! OLMES request files are gzipped JSON lines. Task loaders then read fields by name the same way
//! from either, and a record is small (a question and its choices), so the copy costs nothing
//! next to a forward pass.

use crate::{Error, Result};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::DataType;
use serde_json::{Map, Value};
use std::io::Read;
use std::path::Path;

/// Every row of an Arrow IPC stream file, as objects keyed by column name.
pub fn arrow_records(path: &Path) -> Result<Vec<Value>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = arrow_ipc::reader::StreamReader::try_new(std::io::BufReader::new(file), None)
        .map_err(|e| Error::format(path, format!("not an Arrow IPC stream: {e}")))?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| Error::format(path, format!("corrupt Arrow batch: {e}")))?;
        batch_records(&batch, &mut out).map_err(|m| Error::format(path, m))?;
    }
    Ok(out)
}

/// Every line of a gzipped JSON-lines file.
pub fn jsonl_gz_records(path: &Path) -> Result<Vec<Value>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::io::BufReader::new(file))
        .read_to_string(&mut text)
        .map_err(|e| Error::format(path, format!("not a gzipped UTF-8 file: {e}")))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| Error::format(path, format!("line {}: not JSON: {e}", i + 1)))
        })
        .collect()
}

fn batch_records(batch: &RecordBatch, out: &mut Vec<Value>) -> std::result::Result<(), String> {
    let schema = batch.schema();
    let columns: Vec<(&str, &ArrayRef)> = schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .zip(batch.columns())
        .collect();
    for row in 0..batch.num_rows() {
        let mut obj = Map::new();
        for (name, col) in &columns {
            obj.insert(name.to_string(), cell(col.as_ref(), row)?);
        }
        out.push(Value::Object(obj));
    }
    Ok(())
}

/// One cell as JSON: the types the benchmark splits use (strings, integers, booleans, lists and
/// structs of those); anything else is named in the error.
fn cell(col: &dyn Array, row: usize) -> std::result::Result<Value, String> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Int32Type, Int64Type};
    if col.is_null(row) {
        return Ok(Value::Null);
    }
    Ok(match col.data_type() {
        DataType::Utf8 => Value::from(col.as_string::<i32>().value(row)),
        DataType::LargeUtf8 => Value::from(col.as_string::<i64>().value(row)),
        DataType::Int64 => Value::from(col.as_primitive::<Int64Type>().value(row)),
        DataType::Int32 => Value::from(col.as_primitive::<Int32Type>().value(row)),
        DataType::Boolean => Value::from(col.as_boolean().value(row)),
        DataType::List(_) => {
            let items = col.as_list::<i32>().value(row);
            let cells: std::result::Result<Vec<Value>, String> =
                (0..items.len()).map(|i| cell(items.as_ref(), i)).collect();
            Value::Array(cells?)
        }
        DataType::Struct(fields) => {
            let s = col.as_struct();
            let mut obj = Map::new();
            for (f, c) in fields.iter().zip(s.columns()) {
                obj.insert(f.name().clone(), cell(c.as_ref(), row)?);
            }
            Value::Object(obj)
        }
        other => return Err(format!("column type {other} is not read by whittle")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::builder::{ListBuilder, StringBuilder};
    use arrow_array::{BooleanArray, Int64Array, StringArray};
    use std::sync::Arc;

    /// A stream written by arrow's own writer reads back as the records it was built from.
    #[test]
    fn arrow_stream_reads_back_as_records() {
        let mut endings = ListBuilder::new(StringBuilder::new());
        endings.values().append_value("a");
        endings.values().append_value("b");
        endings.append(true);
        endings.append(true);
        let batch = RecordBatch::try_from_iter([
            ("q", Arc::new(StringArray::from(vec!["x", "y"])) as ArrayRef),
            ("n", Arc::new(Int64Array::from(vec![3, 4])) as ArrayRef),
            (
                "b",
                Arc::new(BooleanArray::from(vec![true, false])) as ArrayRef,
            ),
            ("e", Arc::new(endings.finish()) as ArrayRef),
        ])
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.arrow");
        let mut w = arrow_ipc::writer::StreamWriter::try_new(
            std::fs::File::create(&path).unwrap(),
            &batch.schema(),
        )
        .unwrap();
        w.write(&batch).unwrap();
        w.finish().unwrap();
        let recs = arrow_records(&path).unwrap();
        assert_eq!(
            recs,
            vec![
                serde_json::json!({"q": "x", "n": 3, "b": true, "e": ["a", "b"]}),
                serde_json::json!({"q": "y", "n": 4, "b": false, "e": []}),
            ]
        );
        // Truncated: a clear error naming the file, not a panic.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let err = arrow_records(&path).unwrap_err().to_string();
        assert!(err.contains("t.arrow"), "{err}");
    }

    #[test]
    fn gzipped_json_lines_read_back() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl.gz");
        let mut gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&path).unwrap(),
            flate2::Compression::default(),
        );
        gz.write_all(b"{\"a\": 1}\n{\"a\": 2}\n").unwrap();
        gz.finish().unwrap();
        let recs = jsonl_gz_records(&path).unwrap();
        assert_eq!(
            recs,
            vec![serde_json::json!({"a": 1}), serde_json::json!({"a": 2})]
        );
        std::fs::write(&path, b"not gzip").unwrap();
        assert!(jsonl_gz_records(&path).is_err());
    }
}
