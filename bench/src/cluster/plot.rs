//! Line charts of a `bench cluster` run, drawn by `plotters` once as SVG and once as PNG. Text
//! goes through `ab_glyph` with DejaVu Sans from the system (Debian `fonts-dejavu-core`,
//! installed by `scripts/install-deps.sh`), so no fontconfig is needed.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;

/// Where the font is looked for, first found wins.
const FONT_PATHS: [&str; 2] =
    ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf"];
const SIZE: (u32, u32) = (1100, 520);
const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 23, 23),
];

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Line {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// A shaded span of the x axis (an event: a partition, a node down).
#[derive(Debug, Clone)]
pub struct Span {
    pub label: String,
    pub from: f64,
    pub to: f64,
    /// Spans of the same kind share a shade.
    pub kind: usize,
}

/// A chart: lines over shaded spans.
#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub lines: Vec<Line>,
    pub spans: Vec<Span>,
    /// A line is broken where two points are further apart than this on the x axis (no
    /// samples while a node was down), instead of bridging the gap.
    pub gap: f64,
}

/// Registers the font once; an error names the package that provides it.
fn font() -> Result<()> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let path = FONT_PATHS.iter().find(|path| Path::new(path).is_file()).ok_or_else(|| {
                format!(
                    "no DejaVu Sans font at {}: install Debian's fonts-dejavu-core (scripts/install-deps.sh bench)",
                    FONT_PATHS.join(" or ")
                )
            })?;
            let bytes = std::fs::read(path).map_err(|error| format!("reading {path}: {error}"))?;
            // The font lives as long as the process: plotters keeps a reference to its bytes.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{path} is not a font ab_glyph can read"))
        })
        .clone()
        .map_err(|message| anyhow!(message))
}

/// Draws `chart` to `<stem>.svg` and `<stem>.png`; returns both paths.
pub fn render(chart: &Chart, stem: &Path) -> Result<[PathBuf; 2]> {
    font()?;
    let svg = stem.with_extension("svg");
    let png = stem.with_extension("png");
    draw(SVGBackend::new(&svg, SIZE).into_drawing_area(), chart)
        .with_context(|| format!("drawing {}", svg.display()))?;
    draw(BitMapBackend::new(&png, SIZE).into_drawing_area(), chart)
        .with_context(|| format!("drawing {}", png.display()))?;
    Ok([svg, png])
}

fn failed(error: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{error}")
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, chart: &Chart) -> Result<()> {
    root.fill(&WHITE).map_err(failed)?;
    let points = chart.lines.iter().flat_map(|line| line.points.iter());
    let x_max = points.clone().map(|(x, _)| *x).chain(chart.spans.iter().map(|span| span.to)).fold(1.0, f64::max);
    let y_max = points.map(|(_, y)| *y).fold(0.0, f64::max).max(1e-3) * 1.1;
    let mut context = ChartBuilder::on(&root)
        .caption(&chart.title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(failed)?;
    context
        .configure_mesh()
        .x_desc(chart.x_label.as_str())
        .y_desc(chart.y_label.as_str())
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(failed)?;
    for span in &chart.spans {
        let shade = [RGBColor(250, 180, 60), RGBColor(120, 120, 120), RGBColor(60, 160, 250)][span.kind % 3].mix(0.25);
        context
            .draw_series(std::iter::once(Rectangle::new([(span.from, 0.0), (span.to, y_max)], shade.filled())))
            .map_err(failed)?
            .label(span.label.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 18, y + 5)], shade.filled()));
    }
    for (index, line) in chart.lines.iter().enumerate() {
        let color = COLORS[index % COLORS.len()];
        let mut segments = line.points.chunk_by(|one, two| two.0 - one.0 <= chart.gap);
        let first = segments.next().unwrap_or(&[]);
        context
            .draw_series(LineSeries::new(first.iter().copied(), color.stroke_width(2)))
            .map_err(failed)?
            .label(line.label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        for segment in segments {
            context.draw_series(LineSeries::new(segment.iter().copied(), color.stroke_width(2))).map_err(failed)?;
        }
    }
    context
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(failed)?;
    root.present().map_err(failed)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_renders_to_svg_and_png() {
        let dir = tempfile::tempdir().unwrap();
        let chart = Chart {
            title: "RPO per region".into(),
            x_label: "seconds".into(),
            y_label: "ms".into(),
            lines: vec![
                Line { label: "b".into(), points: vec![(0.0, 20.0), (1.0, 25.0), (2.0, 400.0), (9.0, 30.0)] },
                Line { label: "c".into(), points: vec![] },
            ],
            spans: vec![Span { label: "partition c".into(), from: 1.0, to: 1.5, kind: 0 }],
            gap: 1.0,
        };
        let [svg, png] = render(&chart, &dir.path().join("rpo")).unwrap();
        let svg_text = std::fs::read_to_string(svg).unwrap();
        assert!(
            svg_text.starts_with("<svg") && svg_text.contains("RPO per region") && svg_text.contains("partition c")
        );
        let png_bytes = std::fs::read(png).unwrap();
        assert_eq!(&png_bytes[..8], b"\x89PNG\r\n\x1a\n");
    }
}
