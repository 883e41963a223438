//! Images for the vision encoders: PNG files (any colour type, alpha composited over white, as
//! clipart is drawn on transparency), IDX files (MNIST and Fashion-MNIST, gzipped or not), and
//! the preprocessing a teacher expects (bicubic resize, per-channel normalisation, RGB or BGR).

use crate::vision::resize::resize_cubic;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use std::io::Read;
use std::path::{Path, PathBuf};

/// An RGB image with values in [0, 1], planar (`3 × height × width`).
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub height: usize,
    pub width: usize,
    pub rgb: Vec<f32>,
}

impl Image {
    /// A grey image from 8-bit samples (row-major), its one channel copied to R, G and B.
    pub fn from_gray(height: usize, width: usize, gray: &[u8]) -> Self {
        let plane: Vec<f32> = gray.iter().map(|&g| g as f32 / 255.0).collect();
        Image {
            height,
            width,
            rgb: plane.repeat(3),
        }
    }
}

/// Pixels a decoded image may have at most (a 16k × 16k PNG would need 3 GB as f32).
const MAX_PIXELS: usize = 64 << 20;

/// Decodes a PNG file. A truncated or non-PNG file is an error naming it.
pub fn read_png(path: &Path) -> Result<Image> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |e: png::DecodingError| Error::format(path, format!("not a readable PNG: {e}"));
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().map_err(bad)?;
    let (width, height) = (reader.info().width as usize, reader.info().height as usize);
    if width * height > MAX_PIXELS || width == 0 || height == 0 {
        return Err(Error::format(
            path,
            format!("a {width} × {height} image is not supported"),
        ));
    }
    let mut buf = vec![0u8; reader.output_buffer_size().unwrap_or(0)];
    let frame = reader.next_frame(&mut buf).map_err(bad)?;
    let samples = &buf[..frame.buffer_size()];
    let channels = frame.color_type.samples();
    let mut rgb = vec![0f32; 3 * width * height];
    let plane = width * height;
    for (i, px) in samples.chunks_exact(channels).take(plane).enumerate() {
        let (colour, alpha): ([u8; 3], u8) = match *px {
            [g] => ([g; 3], 255),
            [g, a] => ([g; 3], a),
            [r, g, b] => ([r, g, b], 255),
            [r, g, b, a] => ([r, g, b], a),
            _ => unreachable!("8-bit PNG samples have 1 to 4 channels"),
        };
        let a = alpha as f32 / 255.0;
        for (c, v) in colour.iter().enumerate() {
            rgb[c * plane + i] = (*v as f32 / 255.0) * a + (1.0 - a);
        }
    }
    Ok(Image { height, width, rgb })
}

/// Every `.png` under the given files or folders (recursively), sorted, so a run sees the same
/// order on every machine.
pub fn png_files(roots: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for root in roots {
        if root.is_dir() {
            let mut stack = vec![root.clone()];
            while let Some(dir) = stack.pop() {
                for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
                    let path = entry.map_err(|e| Error::io(&dir, e))?.path();
                    if path.is_dir() {
                        stack.push(path);
                    } else if path
                        .extension()
                        .is_some_and(|x| x.eq_ignore_ascii_case("png"))
                    {
                        out.push(path);
                    }
                }
            }
        } else if root.is_file() {
            out.push(root.clone());
        } else {
            return Err(Error::io(root, std::io::ErrorKind::NotFound.into()));
        }
    }
    out.sort();
    Ok(out)
}

/// Images read from a list of PNG files; the unreadable ones are skipped and listed (a long run
/// must neither die on one bad file nor lose it silently).
pub struct PngSet {
    pub images: Vec<Image>,
    pub paths: Vec<PathBuf>,
    pub skipped: Vec<(PathBuf, String)>,
}

/// Reads `paths`, skipping unreadable files with their reason.
pub fn read_pngs(paths: &[PathBuf]) -> PngSet {
    let mut set = PngSet {
        images: Vec::new(),
        paths: Vec::new(),
        skipped: Vec::new(),
    };
    for path in paths {
        match read_png(path) {
            Ok(img) => {
                set.images.push(img);
                set.paths.push(path.clone());
            }
            Err(e) => set.skipped.push((path.clone(), e.to_string())),
        }
    }
    set
}

/// Reads an IDX file (gzipped when its name ends in `.gz`): unsigned-byte data, returning its
/// dims and bytes. Fashion-MNIST's images are `[n, 28, 28]`, its labels `[n]`.
pub fn read_idx(path: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bytes = if path.extension().is_some_and(|x| x == "gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::format(path, format!("not a readable gzip stream: {e}")))?;
        out
    } else {
        raw
    };
    let bad = |msg: String| Error::format(path, msg);
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad("not an IDX file (bad magic number)".into()));
    }
    if bytes[2] != 0x08 {
        return Err(bad(format!(
            "IDX data type 0x{:02x} (whittle reads unsigned bytes)",
            bytes[2]
        )));
    }
    let rank = bytes[3] as usize;
    let header = 4 + 4 * rank;
    if bytes.len() < header {
        return Err(bad("truncated IDX header".into()));
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    let count: usize = dims.iter().product();
    if bytes.len() != header + count {
        return Err(bad(format!(
            "IDX dims {dims:?} need {count} bytes of data, the file has {}",
            bytes.len() - header
        )));
    }
    Ok((dims, bytes[header..].to_vec()))
}

/// A labelled image set.
pub struct Labelled {
    pub images: Vec<Image>,
    pub labels: Vec<u8>,
}

/// One split of (Fashion-)MNIST from its folder: `{split}-images-idx3-ubyte[.gz]` and
/// `{split}-labels-idx1-ubyte[.gz]`, `split` = `train` or `t10k`.
pub fn read_mnist(dir: &Path, split: &str) -> Result<Labelled> {
    let find = |stem: String| -> Result<PathBuf> {
        [dir.join(format!("{stem}.gz")), dir.join(&stem)]
            .into_iter()
            .find(|p| p.is_file())
            .ok_or_else(|| Error::io(dir.join(stem), std::io::ErrorKind::NotFound.into()))
    };
    let images_path = find(format!("{split}-images-idx3-ubyte"))?;
    let (dims, pixels) = read_idx(&images_path)?;
    let (ldims, labels) = read_idx(&find(format!("{split}-labels-idx1-ubyte"))?)?;
    let [n, h, w] = dims[..] else {
        return Err(Error::format(
            &images_path,
            format!("images of dims {dims:?}"),
        ));
    };
    if ldims != [n] {
        return Err(Error::format(
            &images_path,
            format!("{n} images but labels of dims {ldims:?}"),
        ));
    }
    let images = pixels
        .chunks_exact(h * w)
        .map(|g| Image::from_gray(h, w, g))
        .collect();
    Ok(Labelled { images, labels })
}

/// How a model wants its pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preprocess {
    /// Square side the image is resized to (bicubic; aspect ratio not kept).
    pub size: usize,
    /// Per-channel mean and standard deviation in the [0, 1] scale, in RGB order.
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Preprocess {
    /// ImageNet statistics (DINOv2, EfficientNet, the students).
    pub const fn imagenet(size: usize) -> Self {
        Preprocess {
            size,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }

    /// A batch `[n, 3, size, size]`: resized, clamped to [0, 1] (as 8-bit resizers do), and
    /// normalised.
    pub fn batch(&self, images: &[&Image]) -> Result<Tensor> {
        let s = self.size;
        let mut data = Vec::with_capacity(images.len() * 3 * s * s);
        for img in images {
            let resized = resize_cubic(&img.rgb, 3, img.height, img.width, s, s);
            for (c, plane) in resized.chunks_exact(s * s).enumerate() {
                let (m, sd) = (self.mean[c], self.std[c]);
                data.extend(plane.iter().map(|v| (v.clamp(0.0, 1.0) - m) / sd));
            }
        }
        Ok(Tensor::from_vec(
            data,
            (images.len(), 3, s, s),
            &Device::Cpu,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(path: &Path, w: u32, h: u32, colour: png::ColorType, data: &[u8]) {
        let file = std::fs::File::create(path).unwrap();
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
        enc.set_color(colour);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header().unwrap().write_image_data(data).unwrap();
    }

    #[test]
    fn png_colour_types_and_alpha_over_white() {
        let dir = tempfile::tempdir().unwrap();
        let rgba = dir.path().join("a.png");
        // Two pixels: opaque red, half-transparent black.
        write_png(
            &rgba,
            2,
            1,
            png::ColorType::Rgba,
            &[255, 0, 0, 255, 0, 0, 0, 128],
        );
        let img = read_png(&rgba).unwrap();
        assert_eq!((img.height, img.width), (1, 2));
        let half = 1.0 - 128.0 / 255.0;
        let want = [1.0, half, 0.0, half, 0.0, half];
        for (g, w) in img.rgb.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{:?}", img.rgb);
        }
        let gray = dir.path().join("sub/g.png");
        std::fs::create_dir_all(gray.parent().unwrap()).unwrap();
        write_png(&gray, 1, 2, png::ColorType::Grayscale, &[0, 51]);
        assert_eq!(
            read_png(&gray).unwrap().rgb,
            vec![0.0, 0.2, 0.0, 0.2, 0.0, 0.2]
        );
        // A truncated file and a text file are skipped with their reasons, never fatal.
        let bytes = std::fs::read(&rgba).unwrap();
        std::fs::write(dir.path().join("cut.png"), &bytes[..bytes.len() / 2]).unwrap();
        std::fs::write(dir.path().join("text.png"), b"hello").unwrap();
        let files = png_files(&[dir.path().to_path_buf()]).unwrap();
        assert_eq!(files.len(), 4);
        let set = read_pngs(&files);
        assert_eq!((set.images.len(), set.skipped.len()), (2, 2));
        assert!(
            set.skipped
                .iter()
                .all(|(p, e)| e.contains(&*p.to_string_lossy())),
            "{:?}",
            set.skipped
        );
    }

    #[test]
    fn idx_reads_and_refuses_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut idx = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2];
        idx.extend([0, 255, 51, 102]);
        std::fs::write(dir.path().join("t10k-images-idx3-ubyte"), &idx).unwrap();
        std::fs::write(
            dir.path().join("t10k-labels-idx1-ubyte"),
            [0, 0, 8, 1, 0, 0, 0, 2, 7, 3],
        )
        .unwrap();
        let set = read_mnist(dir.path(), "t10k").unwrap();
        assert_eq!(set.labels, vec![7, 3]);
        assert_eq!(set.images[1].rgb, vec![0.2, 0.4, 0.2, 0.4, 0.2, 0.4]);
        std::fs::write(
            dir.path().join("t10k-images-idx3-ubyte"),
            &idx[..idx.len() - 1],
        )
        .unwrap();
        let e = read_mnist(dir.path(), "t10k").err().unwrap().to_string();
        assert!(e.contains("need 4 bytes"), "{e}");
        let e = read_mnist(dir.path(), "train").err().unwrap().to_string();
        assert!(e.contains("train-images-idx3-ubyte"), "{e}");
    }

    #[test]
    fn preprocess_normalises_per_channel() {
        let img = Image::from_gray(2, 2, &[255; 4]);
        let t = Preprocess::imagenet(4).batch(&[&img]).unwrap();
        assert_eq!(t.dims(), &[1, 3, 4, 4]);
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        for (c, plane) in v.chunks(16).enumerate() {
            let want = (1.0 - [0.485, 0.456, 0.406][c]) / [0.229, 0.224, 0.225][c];
            assert!(plane.iter().all(|x| (x - want).abs() < 1e-5), "{plane:?}");
        }
    }
}
