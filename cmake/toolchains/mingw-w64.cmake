# Cross-compiles for 64-bit Windows with MinGW-w64 (Debian/Ubuntu: g++-mingw-w64-x86-64) and
# runs what it builds under wine: CTest starts each test executable through
# CMAKE_CROSSCOMPILING_EMULATOR.
#
#   cmake -S . -B build/mingw -G Ninja \
#         -DCMAKE_TOOLCHAIN_FILE=cmake/toolchains/mingw-w64.cmake -DIOCPNATIVE_PYTHON=OFF
set(CMAKE_SYSTEM_NAME Windows)
set(CMAKE_SYSTEM_PROCESSOR x86_64)
set(IOCPNATIVE_MINGW_TRIPLE x86_64-w64-mingw32)

# std::thread and std::mutex need the "posix" thread model of MinGW-w64 (winpthreads) before
# GCC 13; Debian ships both variants and points the plain name at "win32", so prefer -posix.
find_program(IOCPNATIVE_MINGW_CXX NAMES ${IOCPNATIVE_MINGW_TRIPLE}-g++-posix
                                        ${IOCPNATIVE_MINGW_TRIPLE}-g++ REQUIRED)
find_program(IOCPNATIVE_MINGW_CC NAMES ${IOCPNATIVE_MINGW_TRIPLE}-gcc-posix
                                       ${IOCPNATIVE_MINGW_TRIPLE}-gcc)
set(CMAKE_CXX_COMPILER ${IOCPNATIVE_MINGW_CXX})
if(IOCPNATIVE_MINGW_CC)
  set(CMAKE_C_COMPILER ${IOCPNATIVE_MINGW_CC})
endif()
find_program(CMAKE_RC_COMPILER NAMES ${IOCPNATIVE_MINGW_TRIPLE}-windres)
# cmake/DebugInfo.cmake splits the tools' DWARF into x.exe.debug with it.
find_program(CMAKE_OBJCOPY NAMES ${IOCPNATIVE_MINGW_TRIPLE}-objcopy)

# Look for libraries and headers in the MinGW sysroot only; programs come from the host.
set(CMAKE_FIND_ROOT_PATH /usr/${IOCPNATIVE_MINGW_TRIPLE})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# Everything static (libgcc, libstdc++, winpthread), so an .exe runs under wine or on Windows
# with no MinGW DLL beside it.
set(CMAKE_EXE_LINKER_FLAGS_INIT "-static -static-libgcc -static-libstdc++")
set(CMAKE_SHARED_LINKER_FLAGS_INIT "-static-libgcc -static-libstdc++")

find_program(IOCPNATIVE_WINE NAMES wine64 wine)
if(IOCPNATIVE_WINE)
  set(CMAKE_CROSSCOMPILING_EMULATOR ${IOCPNATIVE_WINE})
endif()
