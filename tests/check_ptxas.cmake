# ptxas's report on the CUDA objects of the monarchrt library (kept by tools/nvcc_log.sh in
# LOG_DIR) must not say that a kernel's wgmma instructions are serialized (ptxas's "Potential
# Performance Loss" advisories, e.g. C7515: a non-wgmma instruction defines an accumulator
# register inside a wgmma pipeline stage, so ptxas waits for every wgmma before the next; the
# twenty-eighth session found one in the backward's dq kernel that cost it 15% of its time).
# Fails, with the kernels named, if one does, or if no report for sm_90a exists (nothing to
# check). Run by CTest: cmake -DLOG_DIR=... -P check_ptxas.cmake
file(GLOB logs "${LOG_DIR}/*.log")
set(checked 0)
set(bad "")
foreach(log IN LISTS logs)
  file(STRINGS "${log}" lines REGEX "instructions are serialized|for 'sm_90a'")
  foreach(line IN LISTS lines)
    if(line MATCHES "instructions are serialized")
      string(REGEX REPLACE ".*in the function '([^']*)'.*" "\\1" fn "${line}")
      list(APPEND bad "${fn} (${log})")
    else()
      math(EXPR checked "${checked} + 1")
    endif()
  endforeach()
endforeach()
if(checked EQUAL 0)
  message(FATAL_ERROR "no ptxas report for sm_90a in ${LOG_DIR}: build the library for 90a "
                      "(MONARCHRT_CUDA_ARCHS) from a clean build directory, so that every CUDA object is compiled "
                      "through tools/nvcc_log.sh")
endif()
list(LENGTH bad nbad)
if(nbad GREATER 0)
  list(JOIN bad "\n  " text)
  message(FATAL_ERROR "ptxas serialized the wgmma instructions of ${nbad} kernel(s) (ptxas advisory):\n  ${text}")
endif()
message(STATUS "ptxas: ${checked} sm_90a kernels compiled, no serialized wgmma")
