// PHI_RETURN_IF_ERROR(expr): when the absl::Status `expr` is not OK, returns it from the enclosing
// function (which returns absl::Status or absl::StatusOr<T>). For model/, parallel/ and server/;
// kernels/ has no Abseil.
#pragma once

#include "absl/status/status.h"

#define PHI_RETURN_IF_ERROR(expr) \
  do {                            \
    absl::Status _st = (expr);    \
    if (!_st.ok()) return _st;    \
  } while (0)
