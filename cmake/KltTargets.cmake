# Targets are found by file layout, so adding a source or a test needs no edit here:
#   <dir>/*.c                  library code of that folder
#   <dir>/klt_<name>_main.c    the program klt-<name>
#   tests/cpu/test_*.c         Criterion tests, label cpu (linked against the fp64 build)
#   tests/mpi/test_*.c         MPI programs, label mpi, each run under mpirun -np 2 and -np 4
#   tests/gpu/test_*.c         Criterion tests, label gpu (only with the CUDA backend)
#   bench/bench_*.c            benchmark programs
# The model code (kernels, optim, dist, train) is compiled twice: with `real` = float for the
# programs and with `real` = double (KLT_FP64) for the tests' finite-difference checks.

function(klt_sources out)
  set(all)
  foreach(dir ${ARGN})
    file(GLOB found CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/${dir}/*.c)
    list(FILTER found EXCLUDE REGEX "_main\\.c$")
    list(APPEND all ${found})
  endforeach()
  set(${out} ${all} PARENT_SCOPE)
endfunction()

klt_sources(KLT_COMMON_SOURCES common)
add_library(klt_common STATIC ${KLT_COMMON_SOURCES})
target_include_directories(klt_common PUBLIC ${CMAKE_SOURCE_DIR})
target_link_libraries(klt_common PUBLIC Threads::Threads m)

klt_sources(KLT_DATA_SOURCES data)
add_library(klt_data STATIC ${KLT_DATA_SOURCES})
target_link_libraries(klt_data PUBLIC klt_common klt_hdf5)

if(KLT_HAVE_CUDA)
  file(GLOB KLT_CUDA_SOURCES CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/kernels/*.cu ${CMAKE_SOURCE_DIR}/optim/*.cu
       ${CMAKE_SOURCE_DIR}/dist/*.cu)
endif()
if(KLT_HAVE_CUDA AND KLT_CUDA_SOURCES)
  add_library(klt_cuda STATIC ${KLT_CUDA_SOURCES})
  target_include_directories(klt_cuda PUBLIC ${CMAKE_SOURCE_DIR})
  target_compile_options(klt_cuda PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -lineinfo>)
  target_link_libraries(klt_cuda PUBLIC CUDA::cudart CUDA::cublas CUDA::cublasLt klt_nccl klt_common)
  target_compile_definitions(klt_cuda PUBLIC KLT_HAVE_CUDA=1)
endif()

klt_sources(KLT_MODEL_SOURCES kernels optim dist train)
foreach(precision f32 f64)
  add_library(klt_model_${precision} STATIC ${KLT_MODEL_SOURCES})
  target_link_libraries(klt_model_${precision} PUBLIC klt_data klt_common klt_blas MPI::MPI_C
                        PkgConfig::INIH PkgConfig::CJSON)
  if(TARGET klt_cuda)
    target_link_libraries(klt_model_${precision} PUBLIC klt_cuda)
  endif()
endforeach()
target_compile_definitions(klt_model_f64 PUBLIC KLT_FP64=1)

file(GLOB KLT_MAINS CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/*/klt_*_main.c)
foreach(main ${KLT_MAINS})
  get_filename_component(stem ${main} NAME_WE)
  string(REGEX REPLACE "^klt_(.*)_main$" "\\1" name ${stem})
  string(REPLACE "_" "-" name ${name})
  add_executable(klt-${name} ${main})
  target_link_libraries(klt-${name} PRIVATE klt_model_f32)
endforeach()

file(GLOB KLT_BENCHES CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/bench/bench_*.c)
foreach(src ${KLT_BENCHES})
  get_filename_component(name ${src} NAME_WE)
  add_executable(${name} ${src})
  target_link_libraries(${name} PRIVATE klt_model_f32)
endforeach()

enable_testing()
# Tests find their inputs and the programs through these.
set(KLT_TEST_ENV "KLT_SOURCE_DIR=${CMAKE_SOURCE_DIR};KLT_BUILD_DIR=${CMAKE_BINARY_DIR};OPENBLAS_NUM_THREADS=1")

file(GLOB KLT_CPU_TESTS CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/tests/cpu/test_*.c)
foreach(src ${KLT_CPU_TESTS})
  get_filename_component(name ${src} NAME_WE)
  add_executable(${name} ${src})
  target_link_libraries(${name} PRIVATE klt_model_f64 PkgConfig::CRITERION)
  add_test(NAME ${name} COMMAND ${name} --jobs 2)
  set_tests_properties(${name} PROPERTIES LABELS cpu ENVIRONMENT "${KLT_TEST_ENV}")
endforeach()

file(GLOB KLT_MPI_TESTS CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/tests/mpi/test_*.c)
list(FILTER KLT_MPI_TESTS EXCLUDE REGEX "_cuda\\.c$")  # the GPU ones: label gpu-mpi below
foreach(src ${KLT_MPI_TESTS})
  get_filename_component(name ${src} NAME_WE)
  add_executable(${name} ${src})
  target_link_libraries(${name} PRIVATE klt_model_f64)
  foreach(np 2 4)
    add_test(NAME ${name}_np${np}
             COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${np} --oversubscribe
                     ${MPIEXEC_PREFLAGS} $<TARGET_FILE:${name}> ${MPIEXEC_POSTFLAGS})
    set_tests_properties(${name}_np${np} PROPERTIES LABELS mpi TIMEOUT 600
      ENVIRONMENT "${KLT_TEST_ENV};OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMPI_MCA_rmaps_base_oversubscribe=1")
  endforeach()
endforeach()

# tests/mpi/test_*_cuda.c: MPI programs on GPUs with NCCL, one GPU per rank, label gpu-mpi (CI's cpu and
# mpi labels never run them), under mpirun -np 2 and -np 4 (run the one that fits the machine's GPUs).
if(KLT_HAVE_CUDA)
  file(GLOB KLT_GPU_MPI_TESTS CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/tests/mpi/test_*_cuda.c)
  foreach(src ${KLT_GPU_MPI_TESTS})
    get_filename_component(name ${src} NAME_WE)
    add_executable(${name} ${src})
    target_link_libraries(${name} PRIVATE klt_model_f64)
    foreach(np 2 4)
      add_test(NAME ${name}_np${np}
               COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${np} ${MPIEXEC_PREFLAGS}
                       $<TARGET_FILE:${name}> ${MPIEXEC_POSTFLAGS})
      set_tests_properties(${name}_np${np} PROPERTIES LABELS gpu-mpi TIMEOUT 600
        ENVIRONMENT "${KLT_TEST_ENV};OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;NCCL_NVLS_ENABLE=0")
    endforeach()
  endforeach()
endif()

if(KLT_HAVE_CUDA)
  file(GLOB KLT_GPU_TESTS CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/tests/gpu/test_*.c)
  foreach(src ${KLT_GPU_TESTS})
    get_filename_component(name ${src} NAME_WE)
    add_executable(${name} ${src})
    target_link_libraries(${name} PRIVATE klt_model_f64 PkgConfig::CRITERION)
    add_test(NAME ${name} COMMAND ${name} --jobs 1)
    set_tests_properties(${name} PROPERTIES LABELS gpu ENVIRONMENT "${KLT_TEST_ENV}")
  endforeach()
endif()
