// The native runtime's errors: one-line messages that name the problem and the fix, worded as the Python
// runtime words them (runtime/params.py, manifest.py, images.py), so a service sees the same text either way.
#pragma once

#include <stdexcept>
#include <string>

namespace ldm_rt::native {

// Bad input or bad artifacts; what() is one line. The subclasses say which kind, for callers that care.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Artifacts are missing, corrupt, stale or foreign (runtime/manifest.py ArtifactError).
class ArtifactError : public Error {
 public:
  using Error::Error;
};

// A generation parameter is invalid for these artifacts (runtime/params.py GenerationError).
class GenerationError : public Error {
 public:
  using Error::Error;
};

// An init image or mask cannot be used (runtime/images.py ImageInputError).
class ImageInputError : public Error {
 public:
  using Error::Error;
};

// An output file cannot be written as asked (runtime/images.py ImageOutputError, atomic.NotAFileTarget).
class OutputError : public Error {
 public:
  using Error::Error;
};

// The inference backend cannot be opened or run (runtime/backends/base.py BackendError).
class BackendError : public Error {
 public:
  using Error::Error;
};

}  // namespace ldm_rt::native
