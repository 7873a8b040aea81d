// ldm_rt::Pipeline over the Python runtime (runtime/pipeline.py), embedded with pybind11's embedding API
// (https://pybind11.readthedocs.io/en/stable/advanced/embedding.html).
//
// GIL discipline: the interpreter is started once and the starting thread gives the GIL up at once
// (PyEval_SaveThread), so no C++ thread holds it while waiting. Every entry point takes it with
// gil_scoped_acquire for its Python work only; every pybind11 object is created and destroyed under it.
#include "ldm_rt/pipeline.hpp"

#include <pybind11/embed.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <mutex>
#include <utility>

#ifndef LDM_RT_PYTHON_EXECUTABLE
#error "LDM_RT_PYTHON_EXECUTABLE must name the Python that has ldm-rt installed (cpp/CMakeLists.txt sets it)"
#endif

namespace py = pybind11;

namespace ldm_rt {

Error::Error(const std::string& message, std::string python_type)
    : std::runtime_error(message), python_type_(std::move(python_type)) {}

namespace {

std::mutex start_mutex;
std::string started_with;  // the executable the interpreter runs as; empty until started

// Starts the process's one interpreter. It is never finalized: CPython cannot unload extension modules
// (numpy, onnxruntime) for a restart, and other threads may still hold Pipelines while the process exits.
void start_locked(const std::string& executable) {
  if (Py_IsInitialized() != 0) {  // the host process embeds Python itself: use its interpreter
    py::gil_scoped_acquire gil;
    started_with = py::module_::import("sys").attr("executable").cast<std::string>();
    return;
  }
  PyConfig config;
  PyConfig_InitPythonConfig(&config);
  config.parse_argv = 0;
  config.install_signal_handlers = 0;  // signals belong to the host application
  // The executable decides sys.prefix: a venv's bin/python makes site.py read its pyvenv.cfg and add the
  // venv's site-packages, where ldm-rt is installed.
  PyStatus status = PyConfig_SetBytesString(&config, &config.executable, executable.c_str());
  if (PyStatus_Exception(status) != 0) {
    PyConfig_Clear(&config);
    throw Error("cannot use " + executable + " as the Python executable; pass an existing python path");
  }
  try {
    py::initialize_interpreter(&config, 0, nullptr, false);
  } catch (const std::exception& e) {
    throw Error(std::string("the embedded Python did not start (") + e.what() + ") with " + executable +
                "; pass the python of the venv that has ldm-rt installed to ldm_rt::start_python");
  }
  { py::gil_scoped_acquire warm_up; }  // creates pybind11's internals while this thread holds the GIL
  PyEval_SaveThread();                 // from now on the GIL is taken per call, by any thread
  started_with = executable;
}

void ensure_started(const std::string& executable) {
  std::lock_guard<std::mutex> lock(start_mutex);
  if (started_with.empty()) start_locked(executable);
}

// The runtime's errors are ValueError (or OSError) subclasses with a one-line message meant for users;
// anything else is a bug, reported with its class name.
Error to_error(const py::error_already_set& e) {
  std::string type = py::str(e.type().attr("__name__"));
  std::string message = py::str(e.value());
  if (e.matches(PyExc_ImportError)) {
    return Error("cannot import the ldm-rt runtime (" + message + ") in the Python at " + started_with +
                     "; pip install ldm-rt there, or call ldm_rt::start_python with the python of its venv",
                 type);
  }
  if (message.empty()) return Error(type, type);
  if (!e.matches(PyExc_ValueError) && !e.matches(PyExc_OSError)) message = type + ": " + message;
  return Error(message, type);
}

// Runs `body` (which must hold the GIL) and turns Python exceptions into ldm_rt::Error.
template <typename Body>
void call_python(Body&& body) {
  try {
    body();
  } catch (const py::error_already_set& e) {
    throw to_error(e);
  } catch (const py::builtin_exception& e) {  // e.g. a cast of an unexpected result
    throw Error(e.what());
  }
}

py::object size_or_none(int pixels) { return pixels == 0 ? py::object(py::none()) : py::object(py::int_(pixels)); }

}  // namespace

void start_python(const std::string& python_executable) {
  std::lock_guard<std::mutex> lock(start_mutex);
  if (started_with.empty()) {
    start_locked(python_executable);
  } else if (started_with != python_executable) {
    throw Error("the embedded Python already runs as " + started_with + "; call ldm_rt::start_python(" +
                python_executable + ") before the first Pipeline");
  }
}

std::string python_executable() {
  ensure_started(LDM_RT_PYTHON_EXECUTABLE);
  std::lock_guard<std::mutex> lock(start_mutex);
  return started_with;
}

struct Pipeline::Impl {
  py::object pipe;  // ldm_rt.runtime.pipeline.Pipeline; touched only with the GIL held
  std::string model_hash;
};

Pipeline::Pipeline(const std::string& artifacts_dir, const std::string& backend, const std::string& precision) {
  ensure_started(LDM_RT_PYTHON_EXECUTABLE);
  py::gil_scoped_acquire gil;
  call_python([&] {
    auto impl = std::make_unique<Impl>();
    py::object cls = py::module_::import("ldm_rt.runtime.pipeline").attr("Pipeline");
    py::object folder = artifacts_dir.empty() ? py::object(py::none()) : py::object(py::str(artifacts_dir));
    impl->pipe = cls.attr("load")(folder, backend, precision);
    impl->model_hash = impl->pipe.attr("artifacts").attr("model_hash").cast<std::string>();
    impl_ = std::move(impl);
  });
}

Pipeline::~Pipeline() {
  if (impl_) {
    py::gil_scoped_acquire gil;
    impl_.reset();
  }
}

Pipeline::Pipeline(Pipeline&& other) noexcept = default;

Pipeline& Pipeline::operator=(Pipeline&& other) noexcept {
  if (this != &other) {
    if (impl_) {
      py::gil_scoped_acquire gil;
      impl_.reset();
    }
    impl_ = std::move(other.impl_);
  }
  return *this;
}

Image Pipeline::generate(const std::string& prompt, const std::string& negative_prompt, int steps, float guidance,
                         uint64_t seed, int width, int height) const {
  Request request;
  request.prompt = prompt;
  request.negative_prompt = negative_prompt;
  request.steps = steps;
  request.guidance = guidance;
  request.seed = seed;
  request.width = width;
  request.height = height;
  return generate(request);
}

Image Pipeline::generate(const Request& request) const {
  if (!impl_) throw Error("this Pipeline was moved from; use the one it was moved to");
  Image image;
  py::gil_scoped_acquire gil;
  call_python([&] {
    py::dict control;  // only what was given, so the runtime's defaults and checks apply
    if (!request.control_images.empty()) control["control_image"] = py::cast(request.control_images);
    if (!request.controlnet_scales.empty()) control["controlnet_conditioning_scale"] = py::cast(request.controlnet_scales);
    py::dict micro;  // SDXL micro-conditioning: only what was given (the runtime checks it against the model)
    const std::pair<const char*, const std::optional<std::array<int, 2>>*> pairs[] = {
        {"original_size", &request.original_size}, {"crops_coords_top_left", &request.crops_coords_top_left},
        {"target_size", &request.target_size}, {"negative_original_size", &request.negative_original_size},
        {"negative_crops_coords_top_left", &request.negative_crops_coords_top_left},
        {"negative_target_size", &request.negative_target_size}};
    for (const auto& [name, value] : pairs) {
      if (value->has_value()) micro[name] = py::make_tuple((**value)[0], (**value)[1]);
    }
    if (request.aesthetic_score) micro["aesthetic_score"] = *request.aesthetic_score;
    if (request.negative_aesthetic_score) micro["negative_aesthetic_score"] = *request.negative_aesthetic_score;
    py::dict sampler;  // eta only when given: unset is the scheduler's own default
    if (request.eta) sampler["eta"] = *request.eta;
    py::object scheduler = request.scheduler.empty() ? py::object(py::none()) : py::object(py::str(request.scheduler));
    py::object result = impl_->pipe.attr("generate")(
        py::arg("prompt") = request.prompt, py::arg("negative_prompt") = request.negative_prompt,
        py::arg("steps") = request.steps, py::arg("guidance") = request.guidance,
        py::arg("scheduler") = scheduler, py::arg("seed") = request.seed, py::arg("prompt_weighting") = request.prompt_weighting,
        py::arg("height") = size_or_none(request.height), py::arg("width") = size_or_none(request.width), **control,
        **micro, **sampler);
    using Pixels = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;
    Pixels images = Pixels::ensure(result.attr("images"));
    if (!images || images.ndim() != 4 || images.shape(0) < 1 || images.shape(3) != 3) {
      throw Error("the runtime returned images that are not (B, H, W, 3) uint8; ldm-rt and this library disagree");
    }
    image.height = static_cast<int>(images.shape(1));
    image.width = static_cast<int>(images.shape(2));
    const uint8_t* first = images.data();  // image 0 of the batch, (H, W, 3) row-major
    image.rgb.assign(first, first + static_cast<size_t>(image.height) * image.width * 3);
  });
  return image;
}

std::string Pipeline::model_hash() const {
  if (!impl_) throw Error("this Pipeline was moved from; use the one it was moved to");
  return impl_->model_hash;
}

}  // namespace ldm_rt
