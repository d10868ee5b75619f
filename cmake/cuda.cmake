# lib/cuda: NF4/FP4 CUDA kernels, built when nvcc and a CUDA-enabled LibTorch are both present
# (a GPU is not needed to build). Produces llmtune_cuda (sm_80 and sm_90 code) and links it into
# llmtune_quant with LLMTUNE_WITH_CUDA so quant dispatches CUDA tensors to it. Otherwise nothing
# happens and quant stays CPU-only. Included right after the quant module in CMakeLists.txt.
option(LLMTUNE_CUDA_KERNELS "Build lib/cuda when nvcc and a CUDA LibTorch are found" ON)
file(GLOB _llmtune_cu CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/lib/cuda/*.cu)
if(NOT LLMTUNE_CUDA_KERNELS OR NOT _llmtune_cu OR NOT TARGET llmtune_quant OR NOT Torch_FOUND)
  return()
endif()
if(NOT CAFFE2_USE_CUDA)
  message(STATUS "llmtune: lib/cuda skipped (LibTorch is CPU-only)")
  return()
endif()
include(CheckLanguage)
check_language(CUDA)
if(NOT CMAKE_CUDA_COMPILER)
  message(STATUS "llmtune: lib/cuda skipped (no nvcc found)")
  return()
endif()
enable_language(CUDA)
add_library(llmtune_cuda STATIC ${_llmtune_cu})
target_include_directories(llmtune_cuda PUBLIC ${PROJECT_SOURCE_DIR}/lib)
# Two real architectures (A100, H100); no PTX, no other arch: keeps nvcc time modest.
set_target_properties(llmtune_cuda PROPERTIES CUDA_ARCHITECTURES "80-real;90-real" CUDA_STANDARD 17
                                              POSITION_INDEPENDENT_CODE ON)
target_compile_options(llmtune_cuda PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-O3>)
find_package(CUDAToolkit QUIET)
if(TARGET CUDA::cudart)
  target_link_libraries(llmtune_cuda PUBLIC CUDA::cudart)
endif()
target_link_libraries(llmtune_quant PUBLIC llmtune_cuda)
target_compile_definitions(llmtune_quant PRIVATE LLMTUNE_WITH_CUDA)
message(STATUS "llmtune: lib/cuda NF4 kernels enabled (sm_80, sm_90) with ${CMAKE_CUDA_COMPILER}")
