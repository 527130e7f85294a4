# Debug information that crash dumps can use (see "Crash dumps" in README.md).
#
# MinGW produces DWARF, not PDBs. A minidump only holds addresses; a debugger turns them into
# functions and lines from the executable's debug information. We keep that information in a
# separate file beside each executable (x.exe.debug, found through a .gnu_debuglink section) so the
# shipped binary stays small. DWARF 4 rather than GCC's default DWARF 5: the dbghelp of wine 8,
# which winedbg uses to read a minidump, does not understand DWARF 5 (checked: no symbols with 5,
# functions and source lines with 4).
if(MINGW AND CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
  add_compile_options(-gdwarf-4)  # implies -g, so Release builds keep line info for dumps too
endif()

# iocpnative_split_debug_info(<target>): on MinGW, after each link move the DWARF of <target>
# into <file>.debug and leave a debuglink to it in the stripped <file>. Elsewhere: nothing
# (MSVC writes PDBs itself; Linux reports symbolise with backtrace_symbols and addr2line).
function(iocpnative_split_debug_info target)
  if(NOT (MINGW AND CMAKE_CXX_COMPILER_ID STREQUAL "GNU"))
    return()
  endif()
  if(NOT CMAKE_OBJCOPY)
    message(FATAL_ERROR "iocpnative_split_debug_info: no objcopy for this toolchain")
  endif()
  add_custom_command(TARGET ${target} POST_BUILD
    COMMAND ${CMAKE_OBJCOPY} --only-keep-debug $<TARGET_FILE:${target}>
            $<TARGET_FILE:${target}>.debug
    COMMAND ${CMAKE_OBJCOPY} --strip-debug --add-gnu-debuglink=$<TARGET_FILE:${target}>.debug
            $<TARGET_FILE:${target}>
    COMMENT "Splitting debug info of ${target} into $<TARGET_FILE_NAME:${target}>.debug"
    VERBATIM)
endfunction()
