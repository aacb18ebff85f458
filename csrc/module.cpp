// magneto_kernels._C, the Python module: importing it registers the native family's kernels
// (csrc/register.cpp) and every family's Autograd kernels (csrc/autograd.cpp); its functions are
// the typed calls of every family's ops, the tables of common.h for tests, and what the CPU
// kernels run with. With MAGNETO_CUDA_EMULATE=1 it imports magneto_kernels._C_emu, which holds
// the CPU dispatch key then (docs/design.md, Backends and dispatch).
#include <torch/python.h>  // pybind11 with the Tensor type casters

#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/PythonTorchFunctionTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include "backend.h"
#include "cpu/gemm.h"
#include "cpu/kernels.h"
#include "schema.h"

namespace magneto {
namespace {

// ------------------------------------------------------------------------------ typed calls

// The typed calls, _C.call_<op>_<family>: Python's one way to an op outside torch.compile
// (magneto_kernels/ops.py). Each converts its Python arguments to the op's C++ types and calls
// the op's typed dispatcher handle, which dispatches exactly as
// torch.ops.magneto.<op>_<family> does (Autograd key, the device's kernel, dispatch modes)
// without boxing the arguments into a stack and back (docs/design.md, Decisions). Where Python
// must see the call (an argument that is a Tensor subclass, or a torch function mode: the
// __torch_function__ protocol), it makes the torch.ops call instead. Errors and warnings are
// translated as torch.ops translates them, and the GIL is released while the op runs.

const char* type_name(PyObject* obj) {
  const char* name = Py_TYPE(obj)->tp_name;
  const char* dot = std::strrchr(name, '.');
  return dot != nullptr ? dot + 1 : name;
}

[[noreturn]] void wrong_type(const c10::FunctionSchema& schema, size_t index, const char* want,
                             PyObject* obj) {
  throw torch::TypeError(
      c10::str(schema.arguments()[index].name(), " must be ", want, ", got ", type_name(obj)));
}

// A Python argument as the op's C++ argument type A (a TypeError naming the argument, worded as
// magneto_kernels/checks.py words it, otherwise); get() is what the typed call takes.
template <class A>
struct Arg;
template <>
struct Arg<const Tensor&> {
  const Tensor* value;
  Arg(PyObject* obj, const c10::FunctionSchema& schema, size_t index) {
    if (!THPVariable_Check(obj)) wrong_type(schema, index, "a Tensor", obj);
    value = &THPVariable_Unpack(obj);
  }
  const Tensor& get() const { return *value; }
};
template <>
struct Arg<const OptTensor&> {
  OptTensor value;
  Arg(PyObject* obj, const c10::FunctionSchema& schema, size_t index) {
    if (obj == Py_None) return;
    if (!THPVariable_Check(obj)) wrong_type(schema, index, "a Tensor or None", obj);
    value = THPVariable_Unpack(obj);
  }
  const OptTensor& get() const { return value; }
};
template <>
struct Arg<double> {
  double value;
  Arg(PyObject* obj, const c10::FunctionSchema& schema, size_t index) {
    if (PyFloat_Check(obj)) {
      value = PyFloat_AS_DOUBLE(obj);
    } else if (PyLong_Check(obj)) {
      value = PyLong_AsDouble(obj);
      if (value == -1.0 && PyErr_Occurred()) throw python_error();
    } else {
      wrong_type(schema, index, "a float", obj);
    }
  }
  double get() const { return value; }
};
template <>
struct Arg<bool> {
  bool value;
  Arg(PyObject* obj, const c10::FunctionSchema& schema, size_t index) {
    if (!PyBool_Check(obj)) wrong_type(schema, index, "a bool", obj);
    value = obj == Py_True;
  }
  bool get() const { return value; }
};
template <>
struct Arg<std::string_view> {
  std::string_view value;
  Arg(PyObject* obj, const c10::FunctionSchema& schema, size_t index) {
    if (!PyUnicode_Check(obj)) wrong_type(schema, index, "a str", obj);
    Py_ssize_t size = 0;
    const char* data = PyUnicode_AsUTF8AndSize(obj, &size);
    if (data == nullptr) throw python_error();
    value = std::string_view(data, static_cast<size_t>(size));
  }
  std::string_view get() const { return value; }
};

// A list argument: a list or tuple of them.
template <class F>
void for_each_item(PyObject* obj, const c10::FunctionSchema& schema, size_t index,
                   const char* want, F&& f) {
  if (!PyList_Check(obj) && !PyTuple_Check(obj)) wrong_type(schema, index, want, obj);
  const Py_ssize_t size = PySequence_Fast_GET_SIZE(obj);
  PyObject** items = PySequence_Fast_ITEMS(obj);
  for (Py_ssize_t i = 0; i < size; ++i) f(items[i]);
}
template <>
struct Arg<at::TensorList> {
  std::vector<Tensor> value;
  Arg(PyObject* obj, const c10::FunctionSchema& schema, size_t index) {
    for_each_item(obj, schema, index, "a list of Tensors", [&](PyObject* item) {
      if (!THPVariable_Check(item)) wrong_type(schema, index, "a list of Tensors", item);
      value.push_back(THPVariable_Unpack(item));
    });
  }
  at::TensorList get() const { return value; }
};
template <>
struct Arg<const c10::List<OptTensor>&> {
  c10::List<OptTensor> value;
  Arg(PyObject* obj, const c10::FunctionSchema& schema, size_t index) {
    const char* want = "a list of Tensors or None";
    for_each_item(obj, schema, index, want, [&](PyObject* item) {
      if (item != Py_None && !THPVariable_Check(item)) wrong_type(schema, index, want, item);
      value.push_back(item == Py_None ? OptTensor() : OptTensor(THPVariable_Unpack(item)));
    });
  }
  const c10::List<OptTensor>& get() const { return value; }
};

// An op's output as Python holds it: a Tensor, or a list of them.
PyObject* to_python(Tensor&& t) { return THPVariable_Wrap(std::move(t)); }
PyObject* to_python(std::vector<Tensor>&& ts) {
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(ts.size()));
  for (size_t i = 0; i < ts.size(); ++i) {
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), THPVariable_Wrap(std::move(ts[i])));
  }
  return list;
}

// Whether Python must see an argument (see below): a Tensor subclass, in a list too.
bool needs_python(PyObject* obj) {
  if (THPVariable_CheckExact(obj) || obj == Py_None || PyFloat_CheckExact(obj) ||
      PyUnicode_CheckExact(obj) || PyLong_CheckExact(obj)) {
    return false;
  }
  if (PyList_CheckExact(obj) || PyTuple_CheckExact(obj)) {
    const Py_ssize_t size = PySequence_Fast_GET_SIZE(obj);
    PyObject** items = PySequence_Fast_ITEMS(obj);
    for (Py_ssize_t i = 0; i < size; ++i) {
      if (needs_python(items[i])) return true;
    }
    return false;
  }
  return THPVariable_Check(obj);
}

// Whether Python must see a call with these arguments (see above). A subclass of Tensor may
// override __torch_function__; a plain Tensor, Parameter, None, float, int or str does not.
bool needs_python(PyObject* const* args, Py_ssize_t nargs) {
  if (at::impl::torch_function_mode_enabled()) return true;
  for (Py_ssize_t i = 0; i < nargs; ++i) {
    if (needs_python(args[i])) return true;
  }
  return false;
}

template <class Op, const char* Family, class Signature = typename Op::Signature>
struct TypedCall;
template <class Op, const char* Family, class R, class... A>
struct TypedCall<Op, Family, R(A...)> {
  static PyObject* call(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
    HANDLE_TH_ERRORS
    const auto& op = op_handle<Op, Family>();
    if (nargs != static_cast<Py_ssize_t>(sizeof...(A))) {
      throw torch::TypeError(c10::str(op.schema().name(), " takes ", sizeof...(A),
                                      " arguments, got ", nargs));
    }
    if (needs_python(args, nargs)) {
      const pybind11::object overload = pybind11::module_::import("torch")
                                            .attr("ops")
                                            .attr("magneto")
                                            .attr((std::string(Op::kName) + "_" + Family).c_str())
                                            .attr("default");
      return PyObject_Vectorcall(overload.ptr(), args, static_cast<size_t>(nargs), nullptr);
    }
    return call_with(op, args, std::index_sequence_for<A...>{});
    END_HANDLE_TH_ERRORS
  }

  template <size_t... I>
  static PyObject* call_with(const c10::TypedOperatorHandle<R(A...)>& op, PyObject* const* args,
                             std::index_sequence<I...>) {
    // Converted left to right: the first argument of a wrong type is the one named.
    const std::tuple<Arg<A>...> converted{Arg<A>(args[I], op.schema(), I)...};
    R out;
    {
      pybind11::gil_scoped_release no_gil;
      out = op.call(std::get<I>(converted).get()...);
    }
    // An op with one output returns it as torch.ops does, not as a 1-tuple.
    if constexpr (std::is_same_v<R, Tensor>) {
      return to_python(std::move(out));
    } else {
      return std::apply(
          [](auto&... t) {
            PyObject* tuple = PyTuple_New(sizeof...(t));
            Py_ssize_t i = 0;
            (PyTuple_SET_ITEM(tuple, i++, to_python(std::move(t))), ...);
            return tuple;
          },
          out);
    }
  }
};

template <class Op, const char* Family>
void def_typed_call(pybind11::module_& m) {
  static const std::string name = std::string("call_") + Op::kName + "_" + Family;
  static PyMethodDef def{
      name.c_str(),
      reinterpret_cast<PyCFunction>(
          reinterpret_cast<void (*)()>(&TypedCall<Op, Family>::call)),
      METH_FASTCALL,
      "The op's typed call: torch.ops.magneto.<op>_<family> without boxing (csrc/module.cpp)."};
  m.attr(name.c_str()) =
      pybind11::reinterpret_steal<pybind11::object>(PyCFunction_NewEx(&def, nullptr, nullptr));
}

template <const char* Family>
void def_typed_calls(pybind11::module_& m) {
  def_typed_call<schema::LayerNorm, Family>(m);
  def_typed_call<schema::AddLayerNorm, Family>(m);
  def_typed_call<schema::LnLinear, Family>(m);
  def_typed_call<schema::Dropout, Family>(m);
  def_typed_call<schema::LnLinearGroup, Family>(m);
}

// ------------------------------------------------------------------------------------ tables

pybind11::dict codes() {
  pybind11::dict norms, activations, gated_activations, philox, quants;
  for (const auto& entry : kNorms) norms[entry.name] = static_cast<int>(entry.code);
  for (const auto& entry : kQuants) quants[entry.name] = static_cast<int>(entry.code);
  for (const auto& entry : kActivations) activations[entry.name] = static_cast<int>(entry.code);
  for (const auto& entry : kGatedActivations) {
    for (const auto& gate : kActivations) {
      if (gate.code == gate_of(entry.code)) gated_activations[entry.name] = gate.name;
    }
  }
  philox["key_a"] = kPhiloxKeyA;
  philox["key_b"] = kPhiloxKeyB;
  philox["round_a"] = kPhiloxRoundA;
  philox["round_b"] = kPhiloxRoundB;
  philox["rounds"] = kPhiloxRounds;
  pybind11::dict out;
  out["norms"] = norms;
  out["activations"] = activations;
  out["gated_activations"] = gated_activations;
  out["philox"] = philox;
  out["quants"] = quants;
  out["quant_pack_unit"] = kQuantPackUnit;
  out["families"] = pybind11::make_tuple(kNative, kTriton);
  return out;
}

}  // namespace
}  // namespace magneto

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "magneto's C++ CPU and CUDA kernels; importing registers the magneto::*_native ops.";
  if (magneto::cuda_emulation_requested()) {
    try {
      m.attr("emulated_cuda") = pybind11::module_::import("magneto_kernels._C_emu");
    } catch (pybind11::error_already_set& err) {
      throw pybind11::import_error(
          std::string("MAGNETO_CUDA_EMULATE=1 needs magneto_kernels._C_emu, the CUDA kernels "
                      "built for the CPU (MAGNETO_BUILD_CUDA_EMU=1 python3 setup.py build_ext "
                      "--inplace): ") + err.what());
    }
  }
  m.def("with_cuda", []() {
#ifdef MAGNETO_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels were compiled in.");
  m.def("_set_poison_outputs", [](bool on) { magneto::poison_outputs = on; },
        "Tests only: fill outputs and buffers with NaN before the kernels write them.");
  m.def("cpu_gemm_engine", []() { return magneto::cpu::gemm::engine(); },
        "What runs the CPU ln_linear's GEMMs: the engines present, the policy, and the engine "
        "measured fastest per role, dtype and size so far (see csrc/cpu/gemm.h).");
  m.def("_set_cpu_gemm_policy", &magneto::cpu::gemm::set_policy, py::arg("policy"),
        py::arg("hide_onednn") = false,
        "Tests and benchmarks: 'auto', 'aten', 'onednn', 'few_rows' or 'widened' "
        "(MAGNETO_CPU_GEMM until set); hide_onednn: as if torch had no oneDNN linear. Forgets "
        "the measured choices.");
  m.def("_cpu_gemm",
        [](const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& out,
           bool accumulate, const std::string& role) {
          using magneto::cpu::gemm::Role;
          TORCH_CHECK(role == "forward" || role == "input_grad" || role == "weight_grad",
                      "role must be 'forward', 'input_grad' or 'weight_grad', got '", role, "'");
          const Role r = role == "forward"      ? Role::kForward
                         : role == "input_grad" ? Role::kInputGrad
                                                : Role::kWeightGrad;
          return magneto::cpu::gemm::matmul(r, a, b, out.value_or(at::Tensor()), accumulate);
        },
        py::arg("a"), py::arg("b"), py::arg("out"), py::arg("accumulate"),
        py::arg("role") = "forward",
        "Benchmarks and tests: out = a @ b (or out += a @ b), or a @ b into a new tensor (out "
        "None), as the CPU ln_linear runs the GEMM of this role; returns the result.");
  m.def("codes", &magneto::codes,
        "csrc/common.h's tables and the op families, for tests to check against "
        "magneto_kernels/codes.py and backends.py: {'norms': {name: code}, 'activations': "
        "{name: code}, 'gated_activations': {name: gate's activation}, 'philox': {constant: "
        "value}, 'families': (name, ...)}.");
  magneto::def_typed_calls<magneto::kNative>(m);
  magneto::def_typed_calls<magneto::kTriton>(m);
  m.def("cpu_capability", []() { return std::string(magneto::cpu::capability()); },
        "The instruction set the CPU kernels run with: 'avx512', 'avx2' or 'default'.");
  m.def("cpu_isas", []() { return magneto::cpu::supported_isas(); },
        "The instruction sets this CPU can run the kernels with, widest first.");

  // MAGNETO_CPU_ISA is read once, here, so that a bad value fails the import with its name
  // instead of the first kernel call, and a fallback is said once.
  const char* isa_request = std::getenv("MAGNETO_CPU_ISA");
  const magneto::cpu::IsaSelection isa = magneto::cpu::select_isa(isa_request);
  if (!isa.valid) throw pybind11::value_error(isa.note);
  if (!isa.note.empty()) {
    pybind11::module_::import("warnings").attr("warn")(isa.note,
                                                       pybind11::module_::import("builtins")
                                                           .attr("RuntimeWarning"));
  }
}
