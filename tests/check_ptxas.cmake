# Checks ptxas's report on the CUDA objects of the monarchrt library (kept by tools/nvcc_log.sh in
# LOG_DIR; run by CTest as the test ptxas_hopper_kernels: cmake -DLOG_DIR=... -P check_ptxas.cmake).
# Fails, naming the kernels, if
# - any kernel's wgmma instructions are serialized (ptxas's "Potential Performance Loss"
#   advisories, e.g. C7515: a non-wgmma instruction defines an accumulator register inside a wgmma
#   pipeline stage, so ptxas waits for every wgmma before the next; the twenty-eighth session found
#   one in the backward's dq kernel that cost it 15% of its time), or
# - a kernel of the Hopper paths that run by default (the *_wg_kernel kernels and the TMA / wgmma
#   instances, template flag true, of the two-pass stages and the backward's stage 2) spills
#   registers to local memory (the earlier sessions measured spills costing up to a third), or
# - the report holds no sm_90a kernel or none of those Hopper kernels (nothing was checked).
file(GLOB logs "${LOG_DIR}/*.log")
set(hot_regex "_wg_kernel|(monarch_stage1_kernel|monarch_stage2_kernel|monarch_bwd_stage2_kernel)I.*Lb1EEEv")
set(sm90a 0)
set(hot 0)
set(bad "")
foreach(log IN LISTS logs)
  file(STRINGS "${log}" lines REGEX "instructions are serialized|for 'sm_90a'|Function properties for|spill stores")
  set(fn "")
  foreach(line IN LISTS lines)
    if(line MATCHES "instructions are serialized")
      string(REGEX REPLACE ".*in the function '([^']*)'.*" "\\1" name "${line}")
      list(APPEND bad "wgmma serialized: ${name} (${log})")
    elseif(line MATCHES "for 'sm_90a'")
      math(EXPR sm90a "${sm90a} + 1")
    elseif(line MATCHES "Function properties for ([^ ]+)")
      set(fn "${CMAKE_MATCH_1}")
    elseif(fn MATCHES "${hot_regex}" AND line MATCHES "([0-9]+) bytes spill stores")
      math(EXPR hot "${hot} + 1")
      if(NOT CMAKE_MATCH_1 EQUAL 0)
        list(APPEND bad "${CMAKE_MATCH_1} bytes spilled: ${fn} (${log})")
      endif()
    endif()
  endforeach()
endforeach()
list(LENGTH bad nbad)
if(nbad GREATER 0)
  list(JOIN bad "\n  " text)
  message(FATAL_ERROR "ptxas's report shows ${nbad} problem(s):\n  ${text}")
endif()
if(sm90a EQUAL 0 OR hot EQUAL 0)
  message(FATAL_ERROR "no ptxas report of the sm_90a kernels in ${LOG_DIR} (${sm90a} sm_90a kernels, "
                      "${hot} Hopper-path kernels): build the library for 90a (MONARCHRT_CUDA_ARCHS) "
                      "from a clean build directory, so that every CUDA object is compiled through tools/nvcc_log.sh")
endif()
message(STATUS "ptxas: ${sm90a} sm_90a kernels compiled, no serialized wgmma; ${hot} Hopper-path kernel "
               "builds without spills")
