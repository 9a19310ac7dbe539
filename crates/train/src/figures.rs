//! PNG figures without a plotting library: slice panels (image, labels, contour maps) and
//! training curves.

use std::path::Path;

use anyhow::{Context, Result};
use ndarray::{Array2, ArrayView2};

/// A distinct colour per class (0 is black).
pub fn label_colour(k: u8) -> [u8; 3] {
    const PALETTE: [[u8; 3]; 16] = [
        [0, 0, 0],
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 212],
        [0, 128, 128],
        [220, 190, 255],
        [170, 110, 40],
        [255, 250, 200],
        [128, 0, 0],
    ];
    if k == 0 {
        PALETTE[0]
    } else {
        PALETTE[1 + (k as usize - 1) % 15]
    }
}

/// One panel of a figure.
pub enum Panel<'a> {
    /// An image slice, windowed to its 1st–99th percentile.
    Gray(ArrayView2<'a, f32>),
    /// A label slice over an image slice (labels at 60% opacity).
    Labels(ArrayView2<'a, f32>, ArrayView2<'a, u8>),
    /// A binary map (contours) in white over an image slice.
    Mask(ArrayView2<'a, f32>, ArrayView2<'a, u8>),
    /// Categories over an image slice: value `k > 0` painted in `colours[k − 1]` (opaque),
    /// 0 left grey.
    Categories(ArrayView2<'a, f32>, ArrayView2<'a, u8>, &'a [[u8; 3]]),
}

impl Panel<'_> {
    fn image(&self) -> ArrayView2<'_, f32> {
        match self {
            Panel::Gray(a) | Panel::Labels(a, _) | Panel::Mask(a, _) | Panel::Categories(a, ..) => {
                a.view()
            }
        }
    }

    /// The colour of pixel `(y, x)` over grey level `g`.
    fn pixel(&self, y: usize, x: usize, g: u8) -> [u8; 3] {
        let grey = [g, g, g];
        match self {
            Panel::Gray(_) => grey,
            Panel::Labels(_, l) => match l[[y, x]] {
                0 => grey,
                k => {
                    let c = label_colour(k);
                    std::array::from_fn(|i| ((c[i] as u16 * 6 + g as u16 * 4) / 10) as u8)
                }
            },
            Panel::Mask(_, m) if m[[y, x]] != 0 => [255, 255, 0],
            Panel::Mask(..) => grey,
            Panel::Categories(_, m, colours) => match m[[y, x]] {
                0 => grey,
                k => colours
                    .get(k as usize - 1)
                    .copied()
                    .unwrap_or([255, 255, 255]),
            },
        }
    }
}

fn gray(image: ArrayView2<f32>) -> Array2<u8> {
    let mut v: Vec<f32> = image.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f32::total_cmp);
    let (lo, hi) = if v.is_empty() {
        (0.0, 1.0)
    } else {
        (v[v.len() / 100], v[(v.len() * 99) / 100])
    };
    let span = (hi - lo).max(1e-6);
    image.mapv(|x| (((x - lo) / span).clamp(0.0, 1.0) * 255.0) as u8)
}

/// Writes RGB pixels `height × width` to `path` as PNG, through a temporary file
/// ([`cwseg_data::output::write_via_temporary`]: errors name `path`, a failure keeps the old
/// file, a symbolic link or a device keeps being one).
pub fn write_png(path: &Path, width: usize, height: usize, rgb: &[u8]) -> Result<()> {
    let encode = |tmp: &Path| -> std::result::Result<(), String> {
        let file = std::fs::File::create(tmp).map_err(|e| e.to_string())?;
        let mut encoder =
            png::Encoder::new(std::io::BufWriter::new(file), width as u32, height as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
        writer.write_image_data(rgb).map_err(|e| e.to_string())?;
        writer.finish().map_err(|e| e.to_string())
    };
    cwseg_data::output::write_via_temporary(path, ".png", |tmp| {
        encode(tmp)
            .map_err(|e| cwseg_data::DataError::Invalid(format!("writing {}: {e}", path.display())))
    })?;
    Ok(())
}

/// An RGB image on a white background.
struct Canvas {
    width: usize,
    height: usize,
    rgb: Vec<u8>,
}

/// Height in pixels of one line of text at text scale 2 (8 × 8 glyphs doubled, plus spacing).
const LINE: usize = 20;

impl Canvas {
    fn new(width: usize, height: usize) -> Canvas {
        Canvas {
            width,
            height,
            rgb: vec![255; width * height * 3],
        }
    }

    fn put(&mut self, x: usize, y: usize, c: [u8; 3]) {
        if x < self.width && y < self.height {
            let o = (y * self.width + x) * 3;
            self.rgb[o..o + 3].copy_from_slice(&c);
        }
    }

    fn rect(&mut self, x0: usize, y0: usize, w: usize, h: usize, c: [u8; 3]) {
        for y in y0..y0 + h {
            for x in x0..x0 + w {
                self.put(x, y, c);
            }
        }
    }

    /// `text` in black 8 × 8 glyphs (public-domain font8x8) doubled, top-left at `(x0, y0)`;
    /// characters outside ASCII are drawn as `?`. Returns the width drawn.
    fn text(&mut self, x0: usize, y0: usize, text: &str) -> usize {
        self.text_scaled(x0, y0, text, 2)
    }

    /// `text` in black glyphs of `8·scale` pixels (see [`Canvas::text`]).
    fn text_scaled(&mut self, x0: usize, y0: usize, text: &str, scale: usize) -> usize {
        let mut x = x0;
        for ch in text.chars() {
            let code = if ch.is_ascii() {
                ch as usize
            } else {
                b'?' as usize
            };
            let glyph = font8x8::legacy::BASIC_LEGACY[code];
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits & (1 << col) != 0 {
                        self.rect(x + scale * col, y0 + scale * row, scale, scale, [0, 0, 0]);
                    }
                }
            }
            x += 8 * scale;
        }
        x - x0
    }

    /// A line from `a` to `b` (pixel centres, may lie outside), `thick` pixels wide.
    fn line(&mut self, a: (f64, f64), b: (f64, f64), thick: usize, c: [u8; 3]) {
        let steps = (b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil().max(1.0) as usize;
        for s in 0..=steps {
            let t = s as f64 / steps as f64;
            let (x, y) = (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t);
            if x >= 0.0 && y >= 0.0 {
                self.rect(x as usize, y as usize, thick, thick, c);
            }
        }
    }

    /// A panel scaled by `scale` with its top-left corner at `(x0, y0)`.
    fn panel(&mut self, x0: usize, y0: usize, panel: &Panel, scale: usize) {
        let base = gray(panel.image());
        let (h, w) = base.dim();
        for y in 0..h * scale {
            for x in 0..w * scale {
                let (sy, sx) = (y / scale, x / scale);
                let c = panel.pixel(sy, sx, base[[sy, sx]]);
                self.put(x0 + x, y0 + y, c);
            }
        }
    }

    fn save(&self, path: &Path) -> Result<()> {
        write_png(path, self.width, self.height, &self.rgb)
    }
}

/// Panels side by side, each scaled by `scale`, 4 white pixels apart.
pub fn write_panels(path: &Path, panels: &[Panel], scale: usize) -> Result<()> {
    let gap = 4;
    let h = panels.iter().map(|p| p.image().dim().0).max().unwrap_or(1) * scale;
    let w = panels
        .iter()
        .map(|p| p.image().dim().1 * scale + gap)
        .sum::<usize>()
        .saturating_sub(gap)
        .max(1);
    let mut canvas = Canvas::new(w, h.max(1));
    let mut x0 = 0;
    for panel in panels {
        canvas.panel(x0, 0, panel, scale);
        x0 += panel.image().dim().1 * scale + gap;
    }
    canvas.save(path)
}

/// A legend entry: a colour swatch and its name.
pub struct LegendEntry {
    /// The swatch.
    pub colour: [u8; 3],
    /// The name.
    pub name: String,
}

/// A figure: a heading, titled panels on a grid of `columns` columns, each panel scaled by
/// `scale`, and legend lines below (each line a row of swatches and names).
pub fn write_titled_panels(
    path: &Path,
    heading: &str,
    panels: &[(&str, Panel)],
    legend: &[Vec<LegendEntry>],
    columns: usize,
    scale: usize,
) -> Result<()> {
    let columns = columns.clamp(1, panels.len().max(1));
    let rows = panels.len().div_ceil(columns);
    let (ph, pw) = panels
        .iter()
        .map(|(_, p)| p.image().dim())
        .fold((1, 1), |(h, w), (ph, pw)| (h.max(ph), w.max(pw)));
    let title_width = panels.iter().map(|(t, _)| t.len() * 16).max().unwrap_or(0);
    let (cell_w, cell_h, margin) = ((pw * scale).max(title_width), ph * scale + LINE, 12);
    let legend_width = legend
        .iter()
        .map(|line| {
            line.iter()
                .map(|e| 28 + e.name.len() * 16 + 16)
                .sum::<usize>()
        })
        .max()
        .unwrap_or(0);
    let width = (columns * (cell_w + margin) + margin)
        .max(legend_width + 2 * margin)
        .max(heading.len() * 16 + 2 * margin);
    let top = margin + LINE + 4;
    let height = top + rows * (cell_h + margin) + legend.len() * (LINE + 4) + margin;
    let mut canvas = Canvas::new(width, height);
    canvas.text(margin, margin, heading);
    for (i, (title, panel)) in panels.iter().enumerate() {
        let (x0, y0) = (
            margin + (i % columns) * (cell_w + margin),
            top + (i / columns) * (cell_h + margin),
        );
        canvas.text(x0, y0, title);
        canvas.panel(x0, y0 + LINE, panel, scale);
    }
    let mut y = top + rows * (cell_h + margin);
    for line in legend {
        let mut x = margin;
        for entry in line {
            canvas.rect(x, y, 20, 16, [0, 0, 0]);
            canvas.rect(x + 1, y + 1, 18, 14, entry.colour);
            x += 28;
            x += canvas.text(x, y, &entry.name) + 16;
        }
        y += LINE + 4;
    }
    canvas.save(path)
}

/// One chart of [`write_curves`]: a series over epochs in a box with its title, y ticks and
/// an epoch axis.
struct Chart<'a> {
    title: &'a str,
    points: &'a [(f64, f64)],
    top: f64,
    max_epoch: f64,
    colour: [u8; 3],
}

/// Chart geometry, pixels: panel size, plot margins.
const CHART: (usize, usize) = (440, 300);
const MARGIN_LEFT: usize = 64;
const MARGIN_RIGHT: usize = 14;
const MARGIN_TOP: usize = 30;
const MARGIN_BOTTOM: usize = 40;

impl Canvas {
    /// Draws `chart` in the panel whose left edge is `x0`.
    fn chart(&mut self, x0: usize, chart: &Chart) {
        let (pw, ph) = CHART;
        let (left, right) = (x0 + MARGIN_LEFT, x0 + pw - MARGIN_RIGHT);
        let (top, bottom) = (MARGIN_TOP, ph - MARGIN_BOTTOM);
        let to_px = |(e, v): (f64, f64)| -> (f64, f64) {
            let x = left as f64 + (e / chart.max_epoch) * (right - left) as f64;
            let y = bottom as f64 - (v / chart.top).clamp(0.0, 1.0) * (bottom - top) as f64;
            (x, y)
        };
        // title with a swatch of the series' colour (the legend)
        self.rect(left, 10, 16, 10, chart.colour);
        self.text_scaled(left + 22, 8, chart.title, 2);
        // grid and y ticks
        for i in 0..=4 {
            let v = chart.top * i as f64 / 4.0;
            let y = to_px((0.0, v)).1 as usize;
            self.rect(left, y, right - left, 1, [225, 225, 225]);
            let label = tick_label(v);
            let width = 8 * label.len();
            self.text_scaled(
                left.saturating_sub(width + 6),
                y.saturating_sub(4),
                &label,
                1,
            );
        }
        // axes and x ticks at the first, middle and last epoch
        self.rect(left, top, 1, bottom - top + 1, [90, 90, 90]);
        self.rect(left, bottom, right - left, 1, [90, 90, 90]);
        for e in [0.0, (chart.max_epoch / 2.0).round(), chart.max_epoch] {
            let x = to_px((e, 0.0)).0 as usize;
            self.rect(x, bottom, 1, 5, [90, 90, 90]);
            let label = tick_label(e);
            self.text_scaled(x.saturating_sub(4 * label.len()), bottom + 8, &label, 1);
        }
        self.text_scaled((left + right) / 2 - 20, bottom + 22, "epoch", 1);
        for pair in chart.points.windows(2) {
            self.line(to_px(pair[0]), to_px(pair[1]), 2, chart.colour);
        }
        for &p in chart.points {
            let (x, y) = to_px(p);
            self.rect(
                (x - 2.0).max(0.0) as usize,
                (y - 2.0).max(0.0) as usize,
                5,
                5,
                chart.colour,
            );
        }
    }
}

/// A tick value in at most six characters: `0.25`, `12`, `1.2e4`.
fn tick_label(v: f64) -> String {
    let text = if v == 0.0 || (0.01..1000.0).contains(&v.abs()) {
        let digits = if v.fract() == 0.0 { 0 } else { 2 };
        format!("{v:.digits$}")
    } else {
        format!("{v:.1e}")
    };
    text.chars().take(6).collect()
}

/// Training curves from `metrics.jsonl`: the training loss (left, blue) and the validation DSC
/// (right, red, on [0, 1]) per epoch, each with a title, y ticks and an epoch axis.
pub fn write_curves(metrics: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics)
        .with_context(|| format!("reading {}", metrics.display()))?;
    let mut loss = Vec::new();
    let mut dice = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}: bad line", metrics.display()))?;
        let epoch = v["epoch"].as_f64().unwrap_or(0.0);
        if let Some(l) = v["loss"].as_f64() {
            loss.push((epoch, l));
        }
        if let Some(d) = v["val_dice"].as_f64() {
            dice.push((epoch, d));
        }
    }
    let max_epoch = loss.iter().chain(&dice).map(|p| p.0).fold(1.0, f64::max);
    let max_loss = loss.iter().map(|p| p.1).fold(1e-9, f64::max);
    let (pw, ph) = CHART;
    let mut canvas = Canvas::new(2 * pw, ph);
    canvas.chart(
        0,
        &Chart {
            title: "training loss",
            points: &loss,
            top: max_loss * 1.05,
            max_epoch,
            colour: [31, 119, 180],
        },
    );
    canvas.chart(
        pw,
        &Chart {
            title: "validation DSC",
            points: &dice,
            top: 1.0,
            max_epoch,
            colour: [214, 39, 40],
        },
    );
    canvas.save(out)
}
