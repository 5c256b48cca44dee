// Status: the error type of the whole library. Every public function that can fail returns one;
// its message names the argument and the rule it broke, so a caller can print it as it is.
#pragma once

#include <string>
#include <utility>

namespace monarchrt {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument,  // the caller passed something the rules forbid
  kUnsupported,      // valid, but this backend cannot do it (dtype, device, size)
  kIoError,          // a file could not be opened, read or written
  kCorruptData,      // a file was read but its content breaks its format
  kInternal,         // a bug or a failed runtime call
};

const char* status_code_name(StatusCode code);

class Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status ok_status() { return Status(); }
  static Status invalid(std::string m) { return Status(StatusCode::kInvalidArgument, std::move(m)); }
  static Status unsupported(std::string m) { return Status(StatusCode::kUnsupported, std::move(m)); }
  static Status io_error(std::string m) { return Status(StatusCode::kIoError, std::move(m)); }
  static Status corrupt(std::string m) { return Status(StatusCode::kCorruptData, std::move(m)); }
  static Status internal(std::string m) { return Status(StatusCode::kInternal, std::move(m)); }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  // "invalid argument: q: ..." (or "ok").
  std::string to_string() const;

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

// Returns early from the enclosing function when `expr` yields a non-ok Status.
#define MONARCHRT_RETURN_IF_ERROR(expr)              \
  do {                                               \
    ::monarchrt::Status monarchrt_status_ = (expr);  \
    if (!monarchrt_status_.ok()) return monarchrt_status_; \
  } while (0)

}  // namespace monarchrt
