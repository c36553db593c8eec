#![no_std]
//! Empty library target: lets `spicegate` name this crate as a build
//! dependency so cargo rebuilds the object when its sources change.
