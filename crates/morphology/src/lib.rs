#![doc = include_str!("../README.md")]
#![warn(clippy::unwrap_used)]
// a library reports through return values and `tracing`, never by printing (tests may print)
#![cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]

mod components;
mod contour;
mod distance;
mod element;
mod erosion;
mod error;
mod grid;
mod skeleton;
mod uniform;
mod weights;

pub use components::{
    Components, Connectivity, connected_components, keep_largest, label_components,
};
pub use contour::{ContourMap, ContourSpec, contour, contour_map};
pub use distance::{edt, signed_distance};
pub use element::{Border, Element, ErosionSpec};
pub use erosion::{dilate, erode};
pub use error::{MorphologyError, Result};
pub use grid::{Binary, Grid, Label};
pub use skeleton::{skeletonize, tubed_skeleton};
pub use weights::{DwceSpec, dwce_weight_map};
