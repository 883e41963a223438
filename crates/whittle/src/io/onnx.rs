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
    #[prost(message, repeated, tag = "5")]
    attribute: Vec<AttributeProto>,
    #[prost(string, tag = "7")]
    domain: String,
}

#[derive(Clone, PartialEq, Message)]
struct AttributeProto {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(float, tag = "2")]
    f: f32,
    #[prost(int64, tag = "3")]
    i: i64,
    #[prost(bytes = "vec", tag = "4")]
    s: Vec<u8>,
    #[prost(message, optional, tag = "5")]
    t: Option<TensorProto>,
    #[prost(float, repeated, tag = "7")]
    floats: Vec<f32>,
    #[prost(int64, repeated, tag = "8")]
    ints: Vec<i64>,
    #[prost(int32, tag = "20")]
    r#type: i32,
}

#[derive(Clone, PartialEq, Message)]
struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    dims: Vec<i64>,
    #[prost(int32, tag = "2")]
    data_type: i32,
    #[prost(float, repeated, tag = "4")]
    float_data: Vec<f32>,
    #[prost(int32, repeated, tag = "5")]
    int32_data: Vec<i32>,
    #[prost(int64, repeated, tag = "7")]
    int64_data: Vec<i64>,
    #[prost(string, tag = "8")]
    name: String,
    #[prost(bytes = "vec", tag = "9")]
    raw_data: Vec<u8>,
    #[prost(int32, tag = "14")]
    data_location: i32,
}

/// `TensorProto.DataType`: the element types whittle reads.
const FLOAT: i32 = 1;
const INT32: i32 = 6;
const INT64: i32 = 7;
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
    pub attributes: Vec<(String, Attribute)>,
}

impl Node {
    pub fn attribute(&self, name: &str) -> Option<&Attribute> {
        self.attributes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| a)
    }
}

/// A node attribute's value (graph-valued and string-list attributes are not read).
#[derive(Debug, Clone)]
pub enum Attribute {
    Float(f32),
    Int(i64),
    Bytes(Vec<u8>),
    Tensor(Constant),
    Floats(Vec<f32>),
    Ints(Vec<i64>),
    Unsupported(i32),
}

/// A tensor stored in the file (an initializer or a `Constant`): dims and values.
#[derive(Debug, Clone, PartialEq)]
pub struct Constant {
    pub dims: Vec<usize>,
    pub data: Data,
}

/// Element values: floats, or integers (int32 widened).
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    I64(Vec<i64>),
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
            .map(|n| {
                let attributes = n
                    .attribute
                    .into_iter()
                    .map(|a| {
                        let value = attribute(path, &n.name, a.clone())?;
                        Ok((a.name, value))
                    })
                    .collect::<Result<_>>()?;
                Ok(Node {
                    name: n.name,
                    op_type: n.op_type,
                    domain: n.domain,
                    inputs: n.input,
                    outputs: n.output,
                    attributes,
                })
            })
            .collect::<Result<_>>()?;
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

    /// The f32 initializer `name`.
    pub fn initializer(&self, name: &str) -> Result<Initializer> {
        match self.constant(name)? {
            Constant {
                dims,
                data: Data::F32(values),
            } => Ok(Initializer { dims, values }),
            _ => Err(self.error(format!(
                "initializer '{name}' holds integers (whittle reads float32 weights)"
            ))),
        }
    }

    /// The initializer `name`, of any element type whittle reads.
    pub fn constant(&self, name: &str) -> Result<Constant> {
        let t = self
            .initializers
            .get(name)
            .ok_or_else(|| self.error(format!("no initializer '{name}'")))?;
        tensor(&self.path, t)
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

/// Decodes a stored tensor, checked: element type, size against dims, no external data.
fn tensor(path: &Path, t: &TensorProto) -> Result<Constant> {
    let name = &t.name;
    let bad = |msg: String| Error::format(path, format!("tensor '{name}': {msg}"));
    if t.data_location == EXTERNAL {
        return Err(bad(
            "stored outside the file (external data is not supported)".into(),
        ));
    }
    let dims = dims_of(t);
    let count: usize = dims.iter().product();
    let width = match t.data_type {
        FLOAT | INT32 => 4,
        INT64 => 8,
        other => {
            return Err(bad(format!(
                "ONNX element type {other} is not read (float32, int32, int64 are)"
            )))
        }
    };
    let raw = !t.raw_data.is_empty();
    if raw && t.raw_data.len() != count * width {
        return Err(bad(format!(
            "dims {dims:?} need {} bytes, the file holds {}",
            count * width,
            t.raw_data.len()
        )));
    }
    let words = |n: usize| t.raw_data.chunks_exact(n);
    let data = match t.data_type {
        FLOAT if raw => Data::F32(
            words(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ),
        FLOAT => Data::F32(t.float_data.clone()),
        INT32 if raw => Data::I64(
            words(4)
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64)
                .collect(),
        ),
        INT32 => Data::I64(t.int32_data.iter().map(|&v| v as i64).collect()),
        _ if raw => Data::I64(
            words(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect(),
        ),
        _ => Data::I64(t.int64_data.clone()),
    };
    let len = match &data {
        Data::F32(v) => v.len(),
        Data::I64(v) => v.len(),
    };
    if len != count {
        return Err(bad(format!(
            "dims {dims:?} need {count} values, the file holds {len}"
        )));
    }
    Ok(Constant { dims, data })
}

/// `AttributeProto.AttributeType` → [`Attribute`].
fn attribute(path: &Path, node: &str, a: AttributeProto) -> Result<Attribute> {
    Ok(match a.r#type {
        1 => Attribute::Float(a.f),
        2 => Attribute::Int(a.i),
        3 => Attribute::Bytes(a.s),
        4 => match &a.t {
            Some(t) => Attribute::Tensor(tensor(path, t).map_err(|e| {
                Error::format(
                    path,
                    format!("attribute '{}' of node '{node}': {e}", a.name),
                )
            })?),
            None => Attribute::Unsupported(4),
        },
        6 => Attribute::Floats(a.floats),
        7 => Attribute::Ints(a.ints),
        other => Attribute::Unsupported(other),
    })
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
            attribute: vec![AttributeProto {
                name: "axis".into(),
                i: -1,
                r#type: 2,
                ..Default::default()
            }],
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
        assert!(matches!(
            m.nodes[1].attribute("axis"),
            Some(Attribute::Int(-1))
        ));
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
