# Included after project() (CMAKE_PROJECT_INCLUDE) by tools/vm/build-static-agent.sh so that vbridge-guest links
# as one static executable from Debian's packages, without changes to the project's CMake files:
#   - find_library (and so pkg_check_modules, e.g. liburing) prefers static archives (liburing.a);
#   - Debian ships no libfmt.a: fmt::fmt becomes header-only (FMT_HEADER_ONLY), defined here before
#     find_package(fmt) so that fmt's own config leaves it alone;
#   - flatbuffers::flatbuffers is already Debian's libflatbuffers.a.
set(CMAKE_FIND_LIBRARY_SUFFIXES .a)
foreach(target fmt::fmt fmt::fmt-header-only)
  if(NOT TARGET ${target})
    add_library(${target} INTERFACE IMPORTED)
    set_target_properties(${target} PROPERTIES INTERFACE_COMPILE_DEFINITIONS FMT_HEADER_ONLY=1)
  endif()
endforeach()
