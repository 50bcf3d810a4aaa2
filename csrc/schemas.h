// The operator schemas of torch.ops.nhgd_ext, in one place: csrc/ops.cpp
// defines them from this list, and the pure-PyTorch reference backend
// (nhgd_ext/_reference.py) reads the same lines when nothing was compiled.
// One schema string per line; tests/test_opcheck.py checks that the
// registered schemas are these.
#pragma once

#define NHGD_SCHEMAS(NHGD_SCHEMA)                                                                   \
  NHGD_SCHEMA("sherman_morrison_(Tensor(a!) A, Tensor g, float a, float b, Tensor(b!)? status=None, bool lower_only=False) -> ()") \
  NHGD_SCHEMA("sherman_morrison_.tensor(Tensor(a!) A, Tensor g, Tensor a, Tensor b, Tensor(b!)? status=None, bool lower_only=False) -> ()") \
  NHGD_SCHEMA("woodbury_(Tensor(a!) A, Tensor H, float a, Tensor(b!)? status=None) -> ()")          \
  NHGD_SCHEMA("woodbury_.tensor(Tensor(a!) A, Tensor H, Tensor a, Tensor(b!)? status=None) -> ()") \
  NHGD_SCHEMA("kfac_update_(Tensor(a!)[] S_inv, Tensor(b!)[] G_inv, Tensor[] acts, Tensor[] grads, float a, float b, Tensor(c!)? status=None) -> ()") \
  NHGD_SCHEMA("kfac_update_.tensor(Tensor(a!)[] S_inv, Tensor(b!)[] G_inv, Tensor[] acts, Tensor[] grads, Tensor a, Tensor b, Tensor(c!)? status=None) -> ()") \
  NHGD_SCHEMA("kfac_apply(Tensor[] S_inv, Tensor[] G_inv, Tensor[] V) -> Tensor[]")                \
  NHGD_SCHEMA("running_average_(Tensor(a!) L, Tensor B, float a, float b, Tensor(b!)? status=None) -> ()") \
  NHGD_SCHEMA("running_average_.tensor(Tensor(a!) L, Tensor B, Tensor a, Tensor b, Tensor(b!)? status=None) -> ()") \
  NHGD_SCHEMA("symmetrize_(Tensor(a!) A) -> ()")                                                  \
  NHGD_SCHEMA("sherman_morrison_deferred_(Tensor(a!) A, Tensor(b!) pending, Tensor g, float a, float b, Tensor(c!)? status=None) -> ()") \
  NHGD_SCHEMA("apply_pending_(Tensor(a!) A, Tensor(b!) pending) -> ()")                           \
  NHGD_SCHEMA("symmetric_matvec(Tensor A, Tensor v) -> Tensor")
