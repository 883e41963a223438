//! Reading ONNX files: the graph's nodes and its initializers (the weights), not a runtime.
//! Whittle runs the teachers with its own forward passes; the graph is read only to name the
//! weights (exporters leave matrices anonymous, e.g. `onnx::MatMul_1966`) and to refuse a file
//! whose operators the reader was not written for.
//!
//! The messages are the subset of `onnx.proto` (ONNX IR ≥ 3) that this needs, declared with
//! prost's derive: the field numbers are the proto's, unknown fields are skipped.

use crate::{Error, Result};
use prost::Message;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Clone, PartialEq, Message)]
struct ModelProto {
    #[prost(int64, tag = "1")]
    ir_version: i64,
    #[prost(message, optional, tag = "7")]
    graph: Option<GraphProto>,
    #[prost(message, repeated, tag = "8")]
    opset_import: Vec<OperatorSetIdProto>,
}

#[derive(Clone, PartialEq, Message)]
struct OperatorSetIdProto {
    #[prost(string, tag = "1")]
    domain: String,
    #[prost(int64, tag = "2")]
    version: i64,
}

#[derive(Clone, PartialEq, Message)]
struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    node: Vec<NodeProto>,
    #[prost(message, repeated, tag = "5")]
    initializer: Vec<TensorProto>,
}

#[derive(Clone, PartialEq, Message)]
struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    output: Vec<String>,
    #[prost(string, tag = "3")]
    name: String,
    #[prost(string, tag = "4")]
    op_type: String,
    #[prost(string, tag = "7")]
    domain: String,
}

#[derive(Clone, PartialEq, Message)]
struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    dims: Vec<i64>,
    #[prost(int32, tag = "2")]
    data_type: i32,
    #[prost(float, repeated, tag = "4")]
    float_data: Vec<f32>,
    #[prost(string, tag = "8")]
    name: String,
    #[prost(bytes = "vec", tag = "9")]
    raw_data: Vec<u8>,
    #[prost(int32, tag = "14")]
    data_location: i32,
}

/// `TensorProto.DataType.FLOAT`.
const FLOAT: i32 = 1;
/// `TensorProto.DataLocation.EXTERNAL`.
const EXTERNAL: i32 = 1;

/// One node of the graph.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub op_type: String,
    /// Empty for the default ONNX domain.
    pub domain: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

/// An ONNX file's graph and weights.
#[derive(Debug)]
pub struct OnnxModel {
    pub path: PathBuf,
    /// Version of the default-domain operator set.
    pub opset: i64,
    pub nodes: Vec<Node>,
    initializers: HashMap<String, TensorProto>,
}

/// An f32 initializer: its dims and values (row-major).
#[derive(Debug, Clone)]
pub struct Initializer {
    pub dims: Vec<usize>,
    pub values: Vec<f32>,
}

impl OnnxModel {
    /// Reads and decodes a whole file. A truncated or non-ONNX file is a clear error.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::decode(path, &bytes)
    }

    fn decode(path: &Path, bytes: &[u8]) -> Result<Self> {
        let bad = |msg: String| Error::format(path, msg);
        let model = ModelProto::decode(bytes).map_err(|e| {
            bad(format!(
                "not a readable ONNX file (truncated or corrupt?): {e}"
            ))
        })?;
        let graph = model
            .graph
            .ok_or_else(|| bad("the ONNX file has no graph".into()))?;
        if model.ir_version < 3 || graph.node.is_empty() {
            return Err(bad(format!(
                "not an ONNX model whittle can read (IR version {}, {} nodes)",
                model.ir_version,
                graph.node.len()
            )));
        }
        let opset = model
            .opset_import
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map_or(0, |o| o.version);
        let nodes = graph
            .node
            .into_iter()
            .map(|n| Node {
                name: n.name,
                op_type: n.op_type,
                domain: n.domain,
                inputs: n.input,
                outputs: n.output,
            })
            .collect();
        let initializers = graph
            .initializer
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        Ok(OnnxModel {
            path: path.to_path_buf(),
            opset,
            nodes,
            initializers,
        })
    }

    fn error(&self, msg: String) -> Error {
        Error::format(&self.path, msg)
    }

    /// Whether `name` is an initializer (a weight rather than a computed value).
    pub fn is_initializer(&self, name: &str) -> bool {
        self.initializers.contains_key(name)
    }

    /// Names and dims of every initializer, sorted by name.
    pub fn initializer_dims(&self) -> Vec<(&str, Vec<usize>)> {
        let mut all: Vec<_> = self
            .initializers
            .values()
            .map(|t| (t.name.as_str(), dims_of(t)))
            .collect();
        all.sort();
        all
    }

    /// The f32 initializer `name`, checked: dtype, size against dims, no external data.
    pub fn initializer(&self, name: &str) -> Result<Initializer> {
        let t = self
            .initializers
            .get(name)
            .ok_or_else(|| self.error(format!("no initializer '{name}'")))?;
        if t.data_location == EXTERNAL {
            return Err(self.error(format!(
                "initializer '{name}' is stored outside the file (external data is not supported)"
            )));
        }
        if t.data_type != FLOAT {
            return Err(self.error(format!(
                "initializer '{name}' has ONNX data type {} (whittle reads float32 weights)",
                t.data_type
            )));
        }
        let dims = dims_of(t);
        let count: usize = dims.iter().product();
        let values = if !t.raw_data.is_empty() {
            if t.raw_data.len() != count * 4 {
                return Err(self.error(format!(
                    "initializer '{name}' of dims {dims:?} holds {} bytes, expected {}",
                    t.raw_data.len(),
                    count * 4
                )));
            }
            t.raw_data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        } else if t.float_data.len() == count {
            t.float_data.clone()
        } else {
            return Err(self.error(format!(
                "initializer '{name}' of dims {dims:?} holds {} values",
                t.float_data.len()
            )));
        };
        Ok(Initializer { dims, values })
    }

    /// The nodes that read the value `name`.
    pub fn consumers<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.nodes
            .iter()
            .filter(move |n| n.inputs.iter().any(|i| i == name))
    }

    /// Refuses a graph with an operator outside `known` (the reader was written against those),
    /// naming the first such node.
    pub fn check_operators(&self, what: &str, known: &[&str]) -> Result<()> {
        match self
            .nodes
            .iter()
            .find(|n| !n.domain.is_empty() || !known.contains(&n.op_type.as_str()))
        {
            Some(n) => Err(self.error(format!(
                "node '{}' has operator '{}{}', which {what} does not expect (known: {})",
                n.name,
                if n.domain.is_empty() {
                    String::new()
                } else {
                    format!("{}.", n.domain)
                },
                n.op_type,
                known.join(", ")
            ))),
            None => Ok(()),
        }
    }
}

fn dims_of(t: &TensorProto) -> Vec<usize> {
    t.dims.iter().map(|&d| d.max(0) as usize).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A two-node graph with one raw and one `float_data` initializer, encoded by prost.
    fn tiny() -> Vec<u8> {
        let node = |op: &str, name: &str, i: &[&str], o: &str| NodeProto {
            input: i.iter().map(|s| s.to_string()).collect(),
            output: vec![o.into()],
            name: name.into(),
            op_type: op.into(),
            domain: String::new(),
        };
        let raw: Vec<u8> = [1.0f32, -2.0, 3.5, 0.25, 5.0, 6.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        ModelProto {
            ir_version: 7,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: 14,
            }],
            graph: Some(GraphProto {
                node: vec![
                    node("MatMul", "mm", &["x", "w"], "y"),
                    node("Add", "add", &["b", "y"], "z"),
                ],
                initializer: vec![
                    TensorProto {
                        dims: vec![2, 3],
                        data_type: FLOAT,
                        name: "w".into(),
                        raw_data: raw,
                        ..Default::default()
                    },
                    TensorProto {
                        dims: vec![3],
                        data_type: FLOAT,
                        name: "b".into(),
                        float_data: vec![0.5, 1.5, 2.5],
                        ..Default::default()
                    },
                ],
            }),
        }
        .encode_to_vec()
    }

    #[test]
    fn reads_nodes_and_initializers() {
        let m = OnnxModel::decode(Path::new("tiny.onnx"), &tiny()).unwrap();
        assert_eq!(m.opset, 14);
        assert_eq!(m.nodes.len(), 2);
        let w = m.initializer("w").unwrap();
        assert_eq!(w.dims, vec![2, 3]);
        assert_eq!(w.values, vec![1.0, -2.0, 3.5, 0.25, 5.0, 6.0]);
        assert_eq!(m.initializer("b").unwrap().values, vec![0.5, 1.5, 2.5]);
        let after: Vec<_> = m.consumers("y").map(|n| n.name.as_str()).collect();
        assert_eq!(after, ["add"]);
        assert!(m.is_initializer("b") && !m.is_initializer("y"));
        m.check_operators("the test", &["MatMul", "Add"]).unwrap();
        let e = m.check_operators("the test", &["MatMul"]).unwrap_err();
        assert!(
            e.to_string().contains("node 'add' has operator 'Add'"),
            "{e}"
        );
    }

    #[test]
    fn truncated_and_foreign_files_are_errors() {
        let bytes = tiny();
        let e = OnnxModel::decode(Path::new("t.onnx"), &bytes[..bytes.len() - 7]);
        assert!(e.is_err());
        let e = OnnxModel::decode(Path::new("t.onnx"), b"PNG\x89 not onnx at all").unwrap_err();
        assert!(e.to_string().contains("t.onnx"), "{e}");
        let m = OnnxModel::decode(Path::new("t.onnx"), &bytes).unwrap();
        let e = m.initializer("missing").unwrap_err();
        assert!(e.to_string().contains("no initializer 'missing'"), "{e}");
    }
}
