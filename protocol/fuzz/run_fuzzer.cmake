# Runs one libFuzzer target for a bounded time from a fresh copy of its seeds (and of any checked-in
# regression inputs). Called by ctest; see CMakeLists.txt for the variables.
file(REMOVE_RECURSE ${CORPUS})
file(MAKE_DIRECTORY ${CORPUS} ${ARTIFACTS})
file(COPY ${SEEDS}/ DESTINATION ${CORPUS} PATTERN stamp EXCLUDE)
if(EXISTS ${CHECKED_IN})
  file(COPY ${CHECKED_IN}/ DESTINATION ${CORPUS})
endif()
get_filename_component(name ${FUZZER} NAME)
execute_process(
  COMMAND ${FUZZER} -max_total_time=${SECONDS} -rss_limit_mb=${RSS_MB} -max_len=${MAX_LEN} -print_final_stats=1
          -artifact_prefix=${ARTIFACTS}/${name}- ${CORPUS}
  RESULT_VARIABLE result)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "${name} failed (exit ${result}); reproducer in ${ARTIFACTS}")
endif()
